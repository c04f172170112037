"""The torch backend (transformers models). Imported only when `--backend torch` is used."""

from hpd.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
