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


def _structure(model) -> None:
    decoder_of(model)
    head_module(model)


logit_transform, chunked_blocker = families.model_rules(config_of, _structure)


def hidden_states(model, **inputs):
    """Final (post-norm) hidden states (B, T, H) of the decoder run on the model's inputs."""
    return decoder_of(model)(**inputs).last_hidden_state
