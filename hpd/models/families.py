"""Model families: one config, read the same way by transformers 5 and by mlx-lm.

transformers 5 keeps a model's rotary-embedding settings in one nested dict,
`rope_parameters` (per layer type for Gemma3). mlx-lm 0.32's model files read the older
top-level keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`partial_rotary_factor`, GPT-NeoX's `rotary_emb_base`/`rotary_pct`) and fall back to
their own defaults when a key is missing, which silently builds a different model.

The translation here goes through transformers' own reading of a config (its
standardised `rope_parameters`, defaults included), then writes the keys each mlx-lm
family reads, as the data tables below say. Exports carry both forms. The tables also
say how each family scales its logits (for the chunked loss) and which settings a
family's mlx-lm code does not implement, so that loading such a model fails clearly
instead of running a different one.

Checked against transformers 5.24 and mlx-lm 0.32.2; re-check the tables when they move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

SCALING = "*scaling*"  # in a path: the whole rope dict, when it describes a scaled rope

# mlx-lm's top-level key -> where transformers 5 keeps its value inside rope_parameters.
_FLAT = {"rope_theta": ("rope_theta",), "rope_scaling": (SCALING,)}
MLX_ROPE_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "gemma3_text": {"rope_theta": ("full_attention", "rope_theta"),
                    "rope_local_base_freq": ("sliding_attention", "rope_theta"),
                    "rope_scaling": ("full_attention", SCALING)},
    "phi3": {**_FLAT, "partial_rotary_factor": ("partial_rotary_factor",)},
    "gpt_neox": {"rotary_emb_base": ("rope_theta",), "rotary_pct": ("partial_rotary_factor",)},
}

# Rope types a family's mlx-lm code implements, where that is not all of mlx-lm's
# rope_utils (the families that build their rope from rope_theta alone, or phi3's own).
MLX_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "gemma2": ("default",), "cohere": ("default",), "gpt_neox": ("default",),
    "phi3": ("default", "longrope", "su"),
}
# Families whose mlx-lm code applies a partial rotary factor (others rotate every dimension).
MLX_PARTIAL_ROTARY = ("phi3", "gpt_neox")

# Config settings that transformers applies and a family's mlx-lm code ignores.
MLX_IGNORED: dict[str, tuple[str, ...]] = {
    "gemma3_text": ("final_logit_softcapping", "attn_logit_softcapping"),
}

# Config settings that only transformers' eager attention applies: its SDPA and flash paths
# drop them (transformers 5.19, vLLM's pin, builds Gemma2 with SDPA and its logits move by
# ~4e-3), so a model that sets one loads with attn_implementation="eager".
EAGER_ATTENTION: tuple[str, ...] = ("attn_logit_softcapping",)


def needs_eager_attention(config: dict) -> bool:
    return any(config.get(k) not in (None, 0, 0.0) for k in EAGER_ATTENTION)


# Where a family's mlx-lm code computes something close to, not equal to, transformers'
# model: (what differs, applies?). Loading warns; the difference is small but not float noise.
MLX_APPROXIMATES: dict[str, tuple[tuple[str, object], ...]] = {
    "gpt_neox": (("uses the tanh approximation of gelu where this model uses hidden_act={hidden_act!r} "
                  "(logits differ by ~1e-3)",
                  lambda c: c.get("hidden_act", "gelu") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")),),
    "gemma3_text": (("rounds the embedding scale sqrt(hidden_size={hidden_size}) to bfloat16, transformers "
                     "only when the weights are bfloat16 (float32 logits differ by ~1e-3)",
                     lambda c: not float(c.get("hidden_size", 0) ** 0.5).is_integer()),),
}

# Families whose mlx-lm code attends over the whole sequence, ignoring the sliding window
# transformers applies (mlx-lm's llama reads layer_types, but transformers' Mistral
# writes none, and llama needs at least one full-attention layer).
MLX_NO_WINDOW = ("mistral", "gemma2", "qwen2", "qwen3", "phi3", "cohere", "olmo2", "granite")

# Shapes a family's mlx-lm code assumes, whatever the config says: (what it assumes, holds?).
MLX_ASSUMES: dict[str, tuple[tuple[str, object], ...]] = {
    "gemma2": (("an output head tied to the input embedding",
                lambda c: c.get("tie_word_embeddings", True) is not False),),
    "cohere": (("an output head tied to the input embedding",
                lambda c: c.get("tie_word_embeddings", True) is not False),),
    "gpt_neox": (("an MLP 4 x hidden_size wide (it ignores intermediate_size)",
                  lambda c: c.get("intermediate_size") in (None, 4 * c.get("hidden_size", 0))),),
}


@dataclass(frozen=True)
class HeadRule:
    """How a family's forward turns head outputs z = hidden @ W.T into logits."""

    key: str  # the config key holding the factor
    kind: str  # "multiply": z * f; "divide": z / f; "softcap": f * tanh(z / f)


# Both libraries apply these the same way (checked in mlx_lm/models/<family>.py and
# transformers' modeling files). Gemma3's final_logit_softcapping (None in released
# configs) is applied by transformers only; MLX_IGNORED catches it there.
HEAD_RULES: dict[str, HeadRule] = {
    "granite": HeadRule("logits_scaling", "divide"),
    "granitemoe": HeadRule("logits_scaling", "divide"),
    "granitemoehybrid": HeadRule("logits_scaling", "divide"),
    "cohere": HeadRule("logit_scale", "multiply"),
    "cohere2": HeadRule("logit_scale", "multiply"),
    "gemma2": HeadRule("final_logit_softcapping", "softcap"),
    "gemma3_text": HeadRule("final_logit_softcapping", "softcap"),
}
# Keys that scale a head's logits (or the hidden states just before it) in some family,
# as transformers and mlx-lm spell them; a family that sets one without a rule above is
# refused by the chunked loss rather than guessed at.
SCALING_KEYS = ("logits_scaling", "logit_scale", "final_logit_softcapping", "logits_soft_cap",
                "lm_head_multiplier", "output_multiplier", "dim_model_base", "mup_width_multiplier")


# mlx-lm parameter names that transformers spells differently: (mlx-lm prefix, transformers
# prefix), first match wins. mlx-lm's own loader maps the transformers names back.
MLX_WEIGHT_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (("model.h.", "gpt_neox.layers."), ("model.embed_out.", "embed_out."), ("model.", "gpt_neox.")),
}


def transformers_weight_name(model_type: str, name: str) -> str:
    for ours, theirs in MLX_WEIGHT_PREFIXES.get(model_type, ()):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


class FamilyError(ValueError):
    """A model this combination of libraries cannot run exactly."""


def head_scaling(config) -> tuple[float, float] | None:
    """(scale, softcap) of a family's head, from its config (a dict or a config object):
    logits = softcap(scale * hidden @ W.T), softcap 0 meaning none. None when the config
    scales its logits in a way no rule here covers."""
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    rule = HEAD_RULES.get(get("model_type") or "")
    scale, softcap = 1.0, 0.0
    if rule is not None:
        value = get(rule.key)
        if rule.kind == "softcap" and value not in (None, 0, 0.0):
            softcap = float(value)
        elif rule.kind != "softcap" and value is not None:
            if value == 0:
                return None
            scale = float(value) if rule.kind == "multiply" else 1.0 / float(value)
    if unknown_scaling(config, rule):
        return None
    return scale, softcap


def unknown_scaling(config, rule: HeadRule | None = None) -> list[str]:
    """The scaling keys `config` sets that the family's rule does not cover."""
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    if rule is None:
        rule = HEAD_RULES.get(get("model_type") or "")
    return [f"{k}={get(k)}" for k in SCALING_KEYS
            if (rule is None or k != rule.key) and get(k) not in (None, 1, 1.0, 0, 0.0)]


def chunked_blocker(config, find_structure) -> str | None:
    """Why the chunked loss cannot compute a model's logits exactly, or None.
    `find_structure()` raises FamilyError when hpd cannot find the decoder and head."""
    try:
        find_structure()
    except FamilyError as e:
        return str(e)
    unknown = unknown_scaling(config)
    if unknown:
        model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
        return f"{model_type} sets {', '.join(unknown)}, a logit scaling hpd has no rule for in this family"
    return None


def logit_transform(config, find_structure) -> dict[str, float]:
    """Head(scale=..., softcap=...) of a model of the family (HEAD_RULES)."""
    scaling = head_scaling(config)
    if scaling is None:
        raise FamilyError(chunked_blocker(config, find_structure))
    return {"scale": scaling[0], "softcap": scaling[1]}


def model_rules(config_of, find_structure):
    """A backend's `logit_transform(model)` and `chunked_blocker(model)`: the two rules above
    on its model's config (`config_of(model)`), with `find_structure(model)` raising
    FamilyError where the backend cannot find the decoder or the head."""

    def model_logit_transform(model) -> dict[str, float]:
        """Head(scale=..., softcap=...) of the model's family (HEAD_RULES)."""
        return logit_transform(config_of(model), lambda: find_structure(model))

    def model_chunked_blocker(model) -> str | None:
        """Why hpd cannot find this family's hidden states and head, or how its logits are
        scaled (None when it can compute them exactly)."""
        return chunked_blocker(config_of(model), lambda: find_structure(model))

    return model_logit_transform, model_chunked_blocker


def rope_parameters(config: dict) -> dict | None:
    """The rope parameters transformers 5 reads from `config` (nested, defaults filled in),
    or None when transformers does not know the family or it has no rope."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers comes with both backends
        return config.get("rope_parameters")
    model_type = config.get("model_type", "")
    if model_type not in CONFIG_MAPPING:
        return config.get("rope_parameters")
    cls = CONFIG_MAPPING[model_type]  # a lazy mapping: its .get() answers None
    try:
        read = cls.from_dict(copy.deepcopy(config))
    except Exception:  # a config transformers rejects is reported by whichever library loads it
        return config.get("rope_parameters")
    params = getattr(read, "rope_parameters", None)
    return copy.deepcopy(params) if params else None


def mlx_keys(config: dict) -> dict:
    """The top-level keys the family's mlx-lm code reads, from transformers' reading of
    `config`. Raises FamilyError for a setting that mlx-lm would silently ignore."""
    model_type = config.get("model_type", "")
    params = rope_parameters(config)
    out: dict = {}
    if params:
        for key, path in MLX_ROPE_KEYS.get(model_type, _FLAT).items():
            value = _at(params, path)
            if value is not _MISSING:
                out[key] = value
        _check_rope(model_type, params)
    if model_type == "gemma3_text":
        out.update(_gemma3_pattern(config))
    for assumption, holds in MLX_ASSUMES.get(model_type, ()):
        if not holds(config):
            raise FamilyError(f"{model_type}: mlx-lm's {model_type} assumes {assumption}, which this model "
                              "does not have; use --backend torch for this model")
    ignored = [k for k in MLX_IGNORED.get(model_type, ()) if config.get(k) not in (None, 0, 0.0)]
    if ignored:
        values = ", ".join(f"{k}={config[k]}" for k in ignored)
        raise FamilyError(f"{model_type}: mlx-lm's {model_type} ignores {values}, which transformers applies; "
                          "use --backend torch for this model")
    return out


def mlx_differences(config: dict) -> list[str]:
    """Where the family's mlx-lm code runs a close approximation of this model (a warning)."""
    model_type = config.get("model_type", "")
    return [f"{model_type}: mlx-lm's {model_type} " + what.format(**config)
            for what, applies in MLX_APPROXIMATES.get(model_type, ()) if applies(config)]


def mlx_exact_length(config: dict) -> int | None:
    """The longest sequence mlx-lm runs exactly as transformers does, when the family's
    mlx-lm code ignores this model's sliding window (None: no limit)."""
    window = config.get("sliding_window")
    if config.get("model_type") not in MLX_NO_WINDOW or not window or config.get("use_sliding_window") is False:
        return None
    types = config.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def both_forms(config: dict) -> dict:
    """`config` carrying transformers 5's nested rope_parameters and the top-level keys
    mlx-lm and older transformers read, all from one reading of it."""
    out = copy.deepcopy(config)
    params = rope_parameters(config)
    if params:
        out["rope_parameters"] = params
        for key, path in MLX_ROPE_KEYS.get(config.get("model_type", ""), _FLAT).items():
            value = _at(params, path)
            if value is not _MISSING:
                out[key] = value
    if config.get("model_type") == "gemma3_text":
        try:
            out.update(_gemma3_pattern(config))
        except FamilyError:  # mlx-lm cannot run it; transformers reads layer_types
            pass
    return out


def check_mlx_layers(config: dict) -> None:
    """mlx-lm's gemma3_text indexes layer `sliding_window_pattern - 1` (an IndexError deep
    in the forward when a model has fewer layers)."""
    if config.get("model_type") == "gemma3_text":
        pattern = int(config.get("sliding_window_pattern", 6))
        layers = int(config.get("num_hidden_layers", 0))
        if layers < pattern:
            raise FamilyError(f"gemma3_text: mlx-lm needs at least sliding_window_pattern={pattern} layers "
                              f"(this model has {layers}); use --backend torch for this model")


_MISSING = object()


def _at(params: dict, path: tuple[str, ...]):
    node = params
    for part in path:
        if part == SCALING:
            # what older configs call rope_scaling: the dict itself, unless the rope is unscaled
            kind = node.get("rope_type", node.get("type", "default"))
            return None if kind == "default" else {**node, "type": kind, "rope_type": kind}
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _check_rope(model_type: str, params: dict) -> None:
    layers = [v for v in params.values() if isinstance(v, dict)] or [params]
    for layer in layers:
        kind = layer.get("rope_type", layer.get("type", "default"))
        allowed = MLX_ROPE_TYPES.get(model_type)
        if allowed is not None and kind not in allowed:
            raise FamilyError(f"{model_type}: mlx-lm's {model_type} does not implement rope_type={kind!r} "
                              f"(it implements {', '.join(allowed)}); use --backend torch for this model")
        factor = layer.get("partial_rotary_factor", 1.0)
        if factor not in (None, 1, 1.0) and model_type not in MLX_PARTIAL_ROTARY:
            raise FamilyError(f"{model_type}: mlx-lm's {model_type} rotates every dimension but this model "
                              f"has partial_rotary_factor={factor}; use --backend torch for this model")


def _gemma3_pattern(config: dict) -> dict:
    """transformers 5 lists each layer's attention (layer_types); mlx-lm's gemma3_text
    makes every `sliding_window_pattern`-th layer global. The period, when one fits."""
    types = config.get("layer_types")
    if not types:
        return {}
    layers = len(types)
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    candidates = [full[0] + 1] if full else [int(config.get("sliding_window_pattern", 6)), layers + 1]
    for period in candidates:
        if all((t == "full_attention") == ((i + 1) % period == 0) for i, t in enumerate(types)):
            return {"sliding_window_pattern": period}
    raise FamilyError(f"gemma3_text: layer_types {types} follow no period mlx-lm's sliding_window_pattern "
                      "can express; use --backend torch for this model")
