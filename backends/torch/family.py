"""transformers models of every family: where a family keeps its decoder and output head
(mirrors backends/mlx/family.py)."""

from __future__ import annotations

from hpd.models import families


def head_module(model):
    """The module whose weight projects hidden states to logits (tied or not)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise families.FamilyError(f"{model.config.model_type}: transformers' {type(model).__name__} names no "
                                   "output embeddings; hpd cannot find its head")
    return head


def decoder_of(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = model.base_model
    if decoder is None or decoder is model:
        raise families.FamilyError(f"{model.config.model_type}: transformers' {type(model).__name__} has no "
                                   "separate decoder module; hpd cannot read its hidden states")
    return decoder


def config_of(model):
    return model.config


def logit_transform(model) -> dict[str, float]:
    """Head(scale=..., softcap=...) of the model's family (hpd.models.families.HEAD_RULES)."""
    return families.logit_transform(config_of(model), lambda: _structure(model))


def chunked_blocker(model) -> str | None:
    """Why hpd cannot find this family's hidden states and head, or how its logits are
    scaled (None when it can compute them exactly)."""
    return families.chunked_blocker(config_of(model), lambda: _structure(model))


def _structure(model) -> None:
    decoder_of(model)
    head_module(model)


def hidden_states(model, **inputs):
    """Final (post-norm) hidden states (B, T, H) of the decoder run on the model's inputs."""
    return decoder_of(model)(**inputs).last_hidden_state
