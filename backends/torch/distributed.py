"""Data parallelism for the torch backend: several processes started by torchrun.

    torchrun --nproc-per-node N $(which hpd) distill --backend torch ...

`TorchBackend(config)` builds a `DistributedTorchBackend` when WORLD_SIZE > 1; a single
process never imports this module. The loop is the same one: each rank takes its share
of every global batch (`hpd.data.batches.Batches`), losses are divided by the global number of
target tokens (`Backend.all_reduce_sum`), and this backend makes the gradients SUMS over
ranks, so an N-rank step equals a one-process step on the same global batch.

Choices made here:

- process group: nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU;
- student: FSDP2 (`fully_shard` on each decoder layer, then the root; on CUDA a bfloat16
  MixedPrecisionPolicy with float32 gradient reduction over the float32 sharded weights
  that `--dtype auto` gives the student), or DDP (`--parallel ddp`, a full copy per rank);
- teacher: a full copy per rank (`--teacher-placement replicate`) or sharded like the
  student for inference only (`shard`: less memory, one all-gather per layer per forward);
- gradient reduction is a SUM (FSDP2: divide factor 1 with sum-only collectives; DDP: a
  summing comm hook, and `no_sync` on all but the last micro-batch of a step);
- clipping uses the global norm over all shards;
- sampling: hpd's per-position samples come from uniforms keyed by global row and
  position (hpd.objectives.uniforms), the same whatever the process count; torch's global RNG, for
  what still draws from it (rollouts), is seeded with seed + rank so ranks differ, and
  each rank's RNG state is saved in checkpoints for an exact resume;
- checkpoints: sharded model and optimizer state with torch.distributed.checkpoint in
  `step-N/distributed/` (plus `rng-<rank>.safetensors`), next to the full weights that
  rank 0 writes, so a checkpoint stays a loadable model folder; see `hpd.train.checkpoint`;
- export: the full state dict gathered to rank 0's CPU, written in the same format as a
  single-process run.
"""

from __future__ import annotations

import json
import os
import types
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from hpd.backends.torch.backend import (
    TorchBackend,
    model_from_pretrained,
    model_inputs,
)
from hpd.models.backend import Outputs


def init_process_group(device: torch.device) -> None:
    """nccl on CUDA (after selecting this rank's GPU), gloo on CPU; idempotent."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    # not destroyed at exit: with gloo, destroy_process_group in an atexit hook sometimes
    # aborted one rank ("terminate called without an active exception") after a clean run


def _sum_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks: `decoder.layers` for transformers' decoder-only models,
    else the longest ModuleList (an empty list leaves only the root sharded)."""
    layers = getattr(_decoder(model), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class _Runner(torch.nn.Module):
    """What DDP wraps: one forward for both the logits and the hidden-state path, so the
    output-projection weight handed to the chunked loss takes part in DDP's reduction."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict, hidden: bool):
        if hidden:
            h = _decoder(self.model)(**inputs).last_hidden_state
            return h, self.model.get_output_embeddings().weight
        return (self.model(**inputs).logits,)


def _attach_hidden_forward(model, *, clone_head: bool) -> None:
    """`model.hpd_hidden(inputs) -> (hidden, head weight)`, run as an FSDP forward so the
    root's parameters (embeddings, final norm, head) are gathered around it.

    The student's root keeps its parameters gathered after forward (FSDP2's default for the
    root), so the head it returns is the live unsharded parameter and gradients reach it;
    the sharded teacher reshards after every forward, so its head is copied out first."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    def hpd_hidden(self, inputs: dict):
        h = _decoder(self)(**inputs).last_hidden_state
        head = self.get_output_embeddings().weight
        return h, (head.detach().clone() if clone_head else head)

    model.hpd_hidden = types.MethodType(hpd_hidden, model)
    register_fsdp_forward_method(model, "hpd_hidden")


class DistributedTorchBackend(TorchBackend):
    """TorchBackend for one of several torchrun processes (WORLD_SIZE > 1)."""

    # every rank takes part in checkpoint writes and the export (hpd.train.checkpoint, hpd.train.run)
    collective_checkpoint = True

    def __init__(self, config=None):
        super().__init__(config)
        self.compiler = None  # --compile is single-process for now (FSDP2 / DDP wrappers not compiled)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"several processes (torchrun) need --device cuda or cpu, not {self.device.type}")
        init_process_group(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.parallel = getattr(config, "parallel", "fsdp")
        self.teacher_placement = getattr(config, "teacher_placement", "replicate")
        self.grad_accum = int(getattr(config, "grad_accum", 1))
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self._ddp: dict[int, torch.nn.Module] = {}  # id(student) -> DDP(_Runner(student))
        self._micro = 0  # micro-batches since the last optimizer step
        self._unsynced = False  # the last backward ran under DDP's no_sync

    # ------------------------------------------------------------------ loading
    def seed(self, seed: int) -> None:
        super().seed(seed + self.rank)

    def load_model(self, path: str, *, trainable: bool, dtype: str = "auto", quantize: int = 0):
        if quantize:
            raise ValueError("--teacher-quantize is supported by the mlx backend only")
        shard = self.parallel == "fsdp" if trainable else self.teacher_placement == "shard"
        model = model_from_pretrained(path, dtype=self.dtype_for(dtype, trainable))
        if trainable:
            model.train()
            if getattr(self.config, "gradient_checkpointing", False):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.config.use_cache = False
        else:
            model.eval()
            model.requires_grad_(False)
        if shard:  # loaded on CPU; fully_shard moves each rank's shards to the device
            self._shard(model, trainable=trainable)
        else:
            model.to(self.device)
            if trainable:
                self._wrap_ddp(model)
        return model

    def _shard(self, model, *, trainable: bool) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if trainable and self.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        # the student's root keeps its parameters gathered after forward (FSDP2's default);
        # the inference-only teacher frees everything it gathered after each forward
        kwargs = dict(mesh=self.mesh, mp_policy=mp, reshard_after_forward=None if trainable else True)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        if trainable:
            for m in model.modules():
                if isinstance(m, FSDPModule):  # SUM the gradients: losses are already global means
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)
        # transformers' generate then runs `synced_gpus`: every rank keeps stepping until all
        # ranks are done, since each forward all-gathers the shards
        model._is_fsdp_managed_module = True
        _attach_hidden_forward(model, clone_head=not trainable)

    def _wrap_ddp(self, model) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_Runner(model), device_ids=[self.device.index] if self.device.type == "cuda"
                                      else None)
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        self._ddp[id(model)] = ddp

    # ------------------------------------------------------------------ compute
    def run_model(self, model, batch, hidden: bool) -> Outputs:
        if hidden and hasattr(model, "hpd_hidden"):  # sharded: through the root's FSDP hooks
            h, head = model.hpd_hidden(model_inputs(batch))
            return Outputs(hidden=h, head=self.head_of(model, weight=head))
        return super().run_model(model, batch, hidden)

    def forward_backward(self, model, batch, loss_fn, *, hidden: bool = False):
        self._micro += 1
        ddp = self._ddp.get(id(model))
        if ddp is None:  # FSDP2 reduce-scatters every micro-batch's gradients into the shards
            return super().forward_backward(model, batch, loss_fn, hidden=hidden)
        sync = self._micro >= self.grad_accum
        with nullcontext() if sync else ddp.no_sync():
            with self.autocast(model):
                out = ddp(model_inputs(batch), hidden)
            outputs = Outputs(hidden=out[0], head=self.head_of(model, weight=out[1])) if hidden \
                else Outputs(logits=out[0])
            loss, metrics = loss_fn(outputs)
            loss.backward()
        self._unsynced = not sync
        return float(loss.detach()), metrics

    # ------------------------------------------------------------------ optimisation
    def optimizer_step(self, model, optimizer, lr: float, max_grad_norm: float) -> float:
        if self._unsynced:  # more micro-batches than grad_accum said: sum what DDP skipped
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        self._micro, self._unsynced = 0, False
        return super().optimizer_step(model, optimizer, lr, max_grad_norm)

    def clip_gradients(self, params, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in params):  # replicated: every rank holds whole gradients
            return super().clip_gradients(params, max_norm)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):  # a partial norm on each rank: the full one over all shards
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def zero_grad(self, model, optimizer) -> None:
        self._micro, self._unsynced = 0, False
        super().zero_grad(model, optimizer)

    # ------------------------------------------------------------------ state
    def full_weights(self, model) -> dict[str, torch.Tensor]:
        """Called on every rank together: a sharded model's full weights are all-gathered
        onto each rank (every rank's rollout engine loads them)."""
        if not is_sharded(model):
            return super().full_weights(model)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    def save_model(self, model, tokenizer, folder: Path) -> None:
        """Called on every rank: a sharded model is gathered to rank 0, which writes it."""
        folder = Path(folder)
        if not is_sharded(model):
            if self.rank == 0:
                super().save_model(model, tokenizer, folder)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return
        _retie(full, model)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, state_dict=full, safe_serialization=True, max_shard_size="4GB",
                              is_main_process=True)
        _fix_sharded_config(folder / "config.json")
        tokenizer.save_pretrained(folder)
        from hpd.models.export import fix_config, write_generation_config

        fix_config(folder)
        write_generation_config(folder, tokenizer)

    def save_training_state(self, model, optimizer, folder: Path) -> None:
        """Sharded model and optimizer state (torch.distributed.checkpoint); every rank writes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))

    def load_training_state(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _retie(full: dict, model) -> None:
    """Gathered copies of a tied parameter (embeddings and head) are separate tensors; make
    them one again so that save_pretrained drops the alias, as for an unsharded model."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        present = [n for n in group if n in full]
        for n in present[1:]:
            full[n] = full[present[0]]


def _fix_sharded_config(path: Path) -> None:
    """Older transformers name an FSDP2 model's class FSDP<Class> in `architectures`."""
    config = json.loads(path.read_text())
    if not any(a.startswith("FSDP") for a in config.get("architectures") or []):
        return
    config["architectures"] = [a.removeprefix("FSDP") for a in config["architectures"]]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
