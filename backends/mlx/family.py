"""mlx-lm models of every family: loading through hpd.models.families' config translation, and
where a family keeps its decoder and output head (mirrors backends/torch/family.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.nn as nn

from hpd.models import families

# Output projections by name; GPT-NeoX keeps its `embed_out` inside the decoder module.
_HEAD_NAMES = ("lm_head", "embed_out")
# Input embeddings that serve as the head when it is tied.
_EMBED_NAMES = ("embed_tokens", "embed_in", "wte")
_DECODER_NAMES = ("model", "transformer", "gpt_neox")


def load(folder: Path):
    """(model, config) from a model folder in any form transformers writes: the config
    reaches mlx-lm's model classes with the keys they read (hpd.models.families.mlx_keys)."""
    import mlx_lm
    from mlx_lm.utils import load_config, load_model

    config = load_config(folder)
    keys = families.mlx_keys(config)
    families.check_mlx_layers({**config, **keys})
    for message in families.mlx_differences({**config, **keys}):
        warnings.warn(message, stacklevel=3)
    try:
        return load_model(folder, lazy=True, model_config=keys)  # weights are read when evaluated
    except ValueError as e:
        if "not supported" in str(e):
            raise families.FamilyError(f"{config.get('model_type')}: mlx-lm {mlx_lm.__version__} has no model "
                                       "code for this family; use --backend torch for this model") from e
        raise


def decoder_of(model):
    for name in _DECODER_NAMES:
        if name in model and isinstance(model[name], nn.Module):
            return model[name]
    raise families.FamilyError(f"{_family(model)}: hpd does not know where this mlx-lm family keeps its "
                               "decoder; use --backend torch for this model")


def head_module(model):
    """The module whose weight projects hidden states to logits (the embedding when tied)."""
    if "lm_head" in model:
        return model.lm_head
    decoder = decoder_of(model)
    for name in (*_HEAD_NAMES, *_EMBED_NAMES):
        if name in decoder:
            return decoder[name]
    raise families.FamilyError(f"{_family(model)}: hpd does not know where this mlx-lm family keeps its "
                               "output head; use --backend torch for this model")


def config_of(model):
    """The config hpd read the model from (mlx-lm's args when it was built elsewhere)."""
    info = getattr(model, "hpd_info", None)
    if info is not None:
        return info.config
    args = getattr(model, "args", None)
    return dict(vars(args)) if args is not None else {}


def check_length(model, input_ids) -> None:
    """Refuse sequences past a sliding window that the family's mlx-lm code ignores."""
    limit = families.mlx_exact_length(config_of(model)) if isinstance(config_of(model), dict) else None
    if limit is not None and input_ids.shape[-1] > limit:
        model_type = config_of(model).get("model_type")
        raise families.FamilyError(
            f"{model_type}: mlx-lm's {model_type} attends over the whole sequence, but this model slides a "
            f"window of {limit} tokens; sequences of {input_ids.shape[-1]} tokens would get different logits. "
            f"Use --max-length {limit} or --backend torch")


def _structure(model) -> None:
    decoder_of(model)
    head_module(model)


logit_transform, chunked_blocker = families.model_rules(config_of, _structure)


def hidden_states(model, input_ids, cache=None):
    """Final (post-norm) hidden states (B, T, H): the decoder without the head, for the
    families that run their head inside the decoder as well. `cache`: per-layer caches
    (a packed batch's block-diagonal mask rides on them)."""
    decoder, head = decoder_of(model), head_module(model)
    kwargs = {} if cache is None else {"cache": cache}
    inner = next((k for k in _HEAD_NAMES if k in decoder and decoder[k] is head), None)
    if inner is None:
        hidden = decoder(input_ids, **kwargs)
    else:
        decoder[inner] = _Identity()  # the weight stays reachable through `head` for the loss
        try:
            hidden = decoder(input_ids, **kwargs)
        finally:
            decoder[inner] = head
    width = _in_width(head)
    if hidden.shape[-1] != width:
        raise families.FamilyError(f"{_family(model)}: this mlx-lm family's decoder returns width "
                                   f"{hidden.shape[-1]}, not the head's input width {width}")
    return hidden


def save_weights(folder: Path, model) -> None:
    """mlx-lm's save_model, with the parameter names transformers reads for the families
    whose names differ (hpd.models.families.MLX_WEIGHT_PREFIXES)."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards, save_model

    model_type = _family(model)
    if model_type not in families.MLX_WEIGHT_PREFIXES:
        save_model(folder, model, donate_model=False)
        return
    weights = {families.transformers_weight_name(model_type, k): v for k, v in tree_flatten(model.parameters())}
    shards = make_shards(weights)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for shard, name in zip(shards, names):
        mx.save_safetensors(str(Path(folder) / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


class _Identity(nn.Module):
    def __call__(self, x):
        return x


def _in_width(head) -> int:
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return head.scales.shape[-1] * head.group_size
    return head.weight.shape[-1]


def _family(model) -> str:
    return getattr(getattr(model, "args", None), "model_type", None) or type(model).__module__
