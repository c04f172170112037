"""The torch backend: transformers models, AdamW, generate, safetensors state."""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hpd.backends.torch import family
from hpd.files.rng import host_rng_state, seed_host, set_host_rng_state
from hpd.models.backend import Outputs
from hpd.models.families import needs_eager_attention
from hpd.models.loading import hub_failure, local_or_hub, weight_files
from hpd.objectives.heads import Head

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device auto or cpu)")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def from_pretrained(loader, path: str, **kwargs):
    source = local_or_hub(path)
    try:
        return loader.from_pretrained(str(source), **kwargs)
    except OSError as e:
        if isinstance(source, Path):
            raise
        raise hub_failure(path, e) from e


def model_inputs(batch) -> dict:
    """The model's keyword inputs. A packed batch (hpd.data.packing) passes position ids that
    restart at each row and no attention mask: transformers then builds a block-diagonal
    causal mask from the resets (its packed-sequence path, sdpa and eager alike), but only
    without a KV cache, which a bare decoder call would otherwise create."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def model_from_pretrained(path: str, **kwargs):
    """A causal LM from safetensors only: a local folder's weights are checked first, and
    transformers is told never to fall back to pytorch_model.bin (a pickle)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = local_or_hub(path)
    if isinstance(source, Path):
        weight_files(source)
    if needs_eager_attention(from_pretrained(AutoConfig, path).to_dict()):
        kwargs.setdefault("attn_implementation", "eager")
    return from_pretrained(AutoModelForCausalLM, path, use_safetensors=True, **kwargs)


class TorchBackend:
    name = "torch"
    collective_checkpoint = False  # one process saves alone (the torchrun subclass: every rank)

    def __new__(cls, config=None):
        # under torchrun (WORLD_SIZE > 1) the data-parallel subclass in distributed.py;
        # a single process never imports it
        if cls is TorchBackend and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            from hpd.backends.torch.distributed import DistributedTorchBackend

            cls = DistributedTorchBackend
        return super().__new__(cls)

    def __init__(self, config=None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar is the one that matters
        self.config = config
        self.device = pick_device(getattr(config, "device", "auto"))
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        # --compile (backends/torch/compiled.py): the models' forwards and the chunked loss's
        # per-chunk function under torch.compile, lengths padded to buckets
        from hpd.backends.torch import compiled

        mode = getattr(config, "compile", "auto")
        self.compiler = compiled.Compiler(str(getattr(config, "compile_buckets", "64")),
                                          int(getattr(config, "max_length", 1024)), strict=mode == "on") \
            if compiled.enabled(mode, self.device) else None

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def chunk_fn(self):
        """The chunked loss's per-chunk function compiled under --compile, else None."""
        return None if self.compiler is None else self.compiler.chunk_fn()

    @property
    def lora(self):
        """LoRA students on this backend (hpd.backends.torch.lora), imported when used."""
        from hpd.backends.torch import lora

        return lora

    # ------------------------------------------------------------------ loading
    def seed(self, seed: int) -> None:
        seed_host(seed)
        torch.manual_seed(seed)

    def load_tokenizer(self, path: str):
        from transformers import AutoTokenizer

        return from_pretrained(AutoTokenizer, path)

    def dtype_for(self, name: str, trainable: bool) -> torch.dtype:
        """auto: on CUDA the teacher in bfloat16 and the student in float32 under bfloat16
        autocast (AdamW on bfloat16 weights loses small updates); float32 elsewhere."""
        if name == "auto":
            return torch.bfloat16 if self.device.type == "cuda" and not trainable else torch.float32
        return _DTYPES[name]

    def load_model(self, path: str, *, trainable: bool, dtype: str = "auto", quantize: int = 0):
        if quantize:
            raise ValueError("--teacher-quantize is supported by the mlx backend only")
        model = model_from_pretrained(path, dtype=self.dtype_for(dtype, trainable))
        model.to(self.device)
        if trainable:
            model.train()
            if getattr(self.config, "gradient_checkpointing", False):
                model.gradient_checkpointing_enable()
                model.config.use_cache = False
        else:
            model.eval()
            model.requires_grad_(False)
        return model

    def vocab_size(self, model) -> int:
        return int(model.get_output_embeddings().weight.shape[0])

    def head_of(self, model, weight=None) -> Head:
        """The output head as the chunked loss sees it (`weight` overrides the module's,
        for a gathered or cloned copy)."""
        module = family.head_module(model)
        return Head(weight=module.weight if weight is None else weight, **family.logit_transform(model))

    def chunked_blocker(self, model) -> str | None:
        """Why the chunked loss cannot compute this model's logits exactly, or None."""
        if (reason := family.chunked_blocker(model)) is not None:
            return reason
        head = family.head_module(model)
        if not isinstance(head, torch.nn.Linear):
            return f"its output head is a {type(head).__name__}, not a linear layer"
        if head.bias is not None:
            return "its output head has a bias"
        return None

    # ------------------------------------------------------------------ compute
    def to_arrays(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batch.items()}

    def run_model(self, model, batch, hidden: bool) -> Outputs:
        """The model's outputs on `batch` (in the caller's grad mode): logits, or final
        hidden states with the head; compiled under --compile."""
        if self.compiler is not None:
            x = self.compiler.run(model, model_inputs(batch), hidden)
            return Outputs(hidden=x, head=self.head_of(model)) if hidden else Outputs(logits=x)
        if hidden:
            h = family.hidden_states(model, **model_inputs(batch))
            return Outputs(hidden=h, head=self.head_of(model))
        out = model(**model_inputs(batch))
        return Outputs(logits=out.logits)

    def forward(self, model, batch, *, hidden: bool = False) -> Outputs:
        """No gradient and no autograd bookkeeping (inference mode: the outputs can never
        enter a graph), no KV cache (model_inputs)."""
        with torch.inference_mode():
            return self.run_model(model, batch, hidden)

    def autocast(self, model):
        """bfloat16 autocast for a float32 student on CUDA (its weights and AdamW stay float32)."""
        if self.device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward_backward(self, model, batch, loss_fn, *, hidden: bool = False):
        with self.autocast(model):
            out = self.run_model(model, batch, hidden)
        loss, metrics = loss_fn(out)
        if hasattr(loss_fn, "release"):  # the teacher's outputs are not needed by the backward
            loss_fn.release()
        loss.backward()
        return float(loss.detach()), metrics

    def step_metrics(self) -> dict[str, float]:
        """What the loop adds to each step's record: the graphs torch.compile has built."""
        if self.compiler is None:
            return {}
        return {"compile/graphs": self.compiler.stats()["graphs"]}

    # ------------------------------------------------------------------ optimisation
    def make_optimizer(self, model, config):
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel updates every tensor in one pass: on CPU about 3x faster than the
        # per-tensor loop AdamW picks by default there, with the same arithmetic.
        floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        fused = self.device.type in ("cpu", "cuda") and all(p.dtype in floats for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, fused=fused or None)

    def clip_gradients(self, params, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` in place; returns the global norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, model, optimizer, lr: float, max_grad_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(self.clip_gradients(params, max_grad_norm if max_grad_norm > 0 else float("inf")))
        if math.isfinite(norm):  # a NaN/Inf gradient is never applied (the loop skips the step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def weights_finite(self, model) -> bool:
        """No NaN or Inf in this process's weights (its shards, under FSDP)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP shards
        return bool(torch.stack([torch.isfinite(p).all() for p in local]).all())

    def zero_grad(self, model, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, value: float) -> float:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ------------------------------------------------------------------ generation
    def generate(self, model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, greedy: bool = False):
        """Continuations of token-id prompts, cut after EOS (left padding, KV cache).

        Plain temperature sampling unless top_p/top_k are set: transformers' own
        default of top_k=50 is overridden explicitly."""
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        pad = eos if pad is None else pad
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                 use_cache=True, **kwargs)
        model.train(was_training)
        result = []
        for row in out[:, width:].tolist():
            result.append(row[: row.index(eos) + 1] if eos in row else row)
        return result

    # ------------------------------------------------------------------ state
    def full_weights(self, model) -> dict[str, torch.Tensor]:
        from hpd.models.lora import attached

        if attached(model) is not None:
            return self.lora.merged_weights(model)
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}

    def save_model(self, model, tokenizer, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="4GB")
        tokenizer.save_pretrained(folder)
        from hpd.models.export import fix_config, write_generation_config

        fix_config(folder)
        write_generation_config(folder, tokenizer)

    def save_training_state(self, model, optimizer, folder: Path) -> None:
        sd = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
        meta = {"param_groups": [{k: v for k, v in g.items()} for g in sd["param_groups"]], "scalars": scalars}
        (Path(folder) / "optimizer.json").write_text(json.dumps(meta, default=_json_default))

    def load_training_state(self, model, optimizer, folder: Path) -> None:
        folder = Path(folder)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        meta = json.loads((folder / "optimizer.json").read_text())
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = v.to(self.device) if k != "step" else v
        for key, v in meta["scalars"].items():
            idx, k = key.split(".", 1)
            state.setdefault(int(idx), {})[k] = v
        groups = meta["param_groups"]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})

    def rng_state(self) -> dict[str, np.ndarray]:
        state = {"torch": torch.get_rng_state().numpy(), **host_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().numpy()
        return state

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.from_numpy(np.asarray(state["cuda"], dtype=np.uint8)))
        set_host_rng_state(state)


def _json_default(v):
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} as JSON")
