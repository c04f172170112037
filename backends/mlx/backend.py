"""The mlx backend: mlx-lm models and loaders, mlx.optimizers.AdamW, mlx-lm generation.

It mirrors `hpd.backends.torch.backend` method for method; the loop, data, checkpoint
layout and export contract are the same. Differences that a user can notice:

- dtype "auto": the student is float32 everywhere (AdamW updates are too small for
  bfloat16 weights); the teacher is bfloat16 on a GPU (Metal), where memory is the limit,
  and float32 on the CPU, where mlx has no fast bfloat16 kernels. An explicit --dtype
  applies to both models.
- --teacher-quantize 4|8 quantizes the teacher's linear and embedding layers at load
  (mlx affine quantization, group size 64, or 32 where a layer's input width needs it).
- mlx-lm models take no attention mask: batches must be right-padded (hpd.data.examples's are),
  which a causal mask already handles for every real position; packed batches pass their
  block-diagonal mask through a stand-in layer cache (PackedRows).
- --compile on runs the student's step under mx.compile (backends/mlx/compiled.py) where a
  micro-batch's supervised positions fit one chunk; the metrics are arrays until the step
  is evaluated. Otherwise the step is uncompiled: its loss reads metrics as floats.
- Several processes: started by `mlx.launch` (docs/distributed-mlx.md), rank and world size
  come from mx.distributed.init(); each rank's loss is divided by the global token count and
  optimizer_step sums the gradients, so 2 ranks x batch b equal 1 rank x batch 2b.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_reduce, tree_unflatten

from hpd.backends.mlx import family
from hpd.backends.mlx.generation import generate
from hpd.backends.mlx.loading import (
    DTYPE_NAMES,
    DTYPES,
    ModelInfo,
    head_module,
    info_of,
    param_bytes,
    quantize_model,
    resolve_model_path,
)
from hpd.backends.mlx.packed import packed_cache, right_padded
from hpd.files.rng import host_rng_state, seed_host, set_host_rng_state
from hpd.models.backend import Outputs
from hpd.models.loading import weight_files
from hpd.objectives.heads import Head

_STATE_FORMAT = "hpd-mlx-optimizer-1"


class MlxBackend:
    name = "mlx"
    collective_checkpoint = False  # rank 0 saves alone: every rank holds the whole model
    chunk_fn = None  # the chunked loss's chunks run uncompiled (--compile compiles the whole step)

    def __init__(self, config=None):
        self.config = config
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.world_size = self.group.size() if self.group is not None else 1
        self._grads: dict[int, dict] = {}  # id(model) -> gradients accumulated since the last step
        self._steps: dict[int, object] = {}  # id(model) -> its compiled step (compiled.CompiledStep)

    @property
    def device_type(self) -> str:
        """"gpu" (Metal, or a CUDA build of mlx) or "cpu"."""
        return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"

    @property
    def lora(self):
        """LoRA students on this backend (hpd.backends.mlx.lora), imported when used."""
        from hpd.backends.mlx import lora

        return lora

    # ------------------------------------------------------------------ loading
    def seed(self, seed: int) -> None:
        seed_host(seed)
        mx.random.seed(seed % 2**64)

    def load_tokenizer(self, path: str):
        """The Hugging Face tokenizer that mlx-lm loads (not its TokenizerWrapper), so that
        hpd.data.examples sees exactly the object and ids the torch backend sees."""
        from mlx_lm.utils import load_tokenizer

        from hpd.models.export import TOKENIZER_FILES

        folder = resolve_model_path(path)
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); mlx-lm would silently "
                "build an empty tokenizer"
            )
        return load_tokenizer(folder)._tokenizer

    def dtype_for(self, name: str, *, trainable: bool):
        if name == "auto":
            return mx.bfloat16 if self.device_type == "gpu" and not trainable else mx.float32
        return DTYPES[name]

    def load_model(self, path: str, *, trainable: bool, dtype: str = "auto", quantize: int = 0):
        if quantize and trainable:
            raise ValueError("only the teacher can be quantized (--teacher-quantize); the student trains")
        if quantize not in (0, 4, 8):
            raise ValueError(f"quantize={quantize}: allowed 0, 4, 8")
        folder = resolve_model_path(path)
        weight_files(folder)  # safetensors only, whole, inside the folder
        model, config = family.load(folder)  # weights are read as they are evaluated below
        if "quantization" in config:
            if trainable:
                raise ValueError(f"{folder} holds a quantized model; a student must be full precision")
            quantize = 0  # already quantized by its author: keep it
        model.set_dtype(self.dtype_for(dtype, trainable=trainable))
        info = ModelInfo(config=config, path=str(folder))
        if quantize:
            info.bytes_before_quantize = param_bytes(model)
            info.layers_quantized = quantize_model(model, quantize)
            info.quantize = quantize
        for _, array in tree_flatten(model.parameters()):
            # one array at a time: a quantized teacher never holds all its full-precision weights
            mx.eval(array)
        if trainable:
            model.train()
            model.unfreeze()
            if getattr(self.config, "gradient_checkpointing", False):
                from hpd.backends.mlx.lora import enable_checkpointing

                enable_checkpointing(model)
        else:
            model.eval()
            model.freeze()
        model.hpd_info = info  # a plain object: nn.Module keeps it out of the parameter tree
        return model

    def vocab_size(self, model) -> int:
        return int(head_module(model).weight.shape[0])  # rows: also right when quantized

    def head_of(self, model) -> Head:
        """The output head as the chunked loss sees it: dense or quantized (mlx affine),
        with the family's logit scaling or soft-capping."""
        module = head_module(model)
        transform = family.logit_transform(model)
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return Head(weight=module.weight, scales=module.scales, biases=module.get("biases"),
                        group_size=module.group_size, bits=module.bits, **transform)
        # a frozen dense head (a LoRA student's): the chunked loss forms no gradient for it
        frozen = "weight" not in dict(tree_flatten(module.trainable_parameters()))
        return Head(weight=module.weight, frozen=frozen, **transform)

    def chunked_blocker(self, model) -> str | None:
        """Why the chunked loss cannot compute this model's logits exactly, or None."""
        if not hasattr(mx, "custom_function"):
            return f"mlx {mx.__version__} has no custom_function (the chunked loss needs mlx >= 0.22)"
        if (reason := family.chunked_blocker(model)) is not None:
            return reason
        head = head_module(model)
        if isinstance(head, nn.Linear) and "bias" in head:
            return "its output head has a bias"
        if getattr(head, "mode", "affine") != "affine":
            return f"its output head is quantized in mode {head.mode!r} (only affine is supported)"
        return None

    # ------------------------------------------------------------------ compute
    def to_arrays(self, batch: dict[str, np.ndarray]) -> dict[str, mx.array]:
        mask = batch.get("attention_mask")
        if mask is not None and not right_padded(np.asarray(mask)):
            raise ValueError("the mlx backend needs right-padded batches (mlx-lm models take no attention mask)")
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if np.issubdtype(v.dtype, np.integer):
                v = v.astype(np.int32)
            elif np.issubdtype(v.dtype, np.floating) and v.dtype != np.float32:
                v = v.astype(np.float32)
            out[k] = mx.array(v)
        if "position_ids" in batch:  # packed rows: built once for the teacher and the student
            from hpd.data.packing import block_causal_mask

            out["block_mask"] = mx.array(block_causal_mask(np.asarray(batch["position_ids"])))
        return out

    def run_model(self, model, batch, hidden: bool) -> Outputs:
        """The model's outputs on `batch`, traced where the caller differentiates: logits,
        or final hidden states with the head."""
        family.check_length(model, batch["input_ids"])
        cache = packed_cache(model, batch["block_mask"]) if "block_mask" in batch else None
        if hidden:
            return Outputs(hidden=family.hidden_states(model, batch["input_ids"], cache), head=self.head_of(model))
        return Outputs(logits=model(batch["input_ids"], cache=cache))

    def forward(self, model, batch, *, hidden: bool = False) -> Outputs:
        out = self.run_model(model, batch, hidden)
        if hidden:
            out.hidden = mx.stop_gradient(out.hidden)
            mx.eval(out.hidden)  # keep the teacher out of the student's graph
        else:
            out.logits = mx.stop_gradient(out.logits)
            mx.eval(out.logits)
        return out

    def forward_backward(self, model, batch, loss_fn, *, hidden: bool = False):
        if self._compiles(model, loss_fn):
            return self._compiled_forward_backward(model, batch, loss_fn)
        metrics: dict[str, float] = {}
        if hidden and getattr(self.config, "gradient_checkpointing", False):
            value, grads = self._checkpointed_value_and_grad(model, batch, loss_fn, metrics)
        else:
            def objective():
                value, found = loss_fn(self.run_model(model, batch, hidden))
                metrics.update(found)  # Python floats: returned aside, not through the transform
                return value

            value, grads = nn.value_and_grad(model, objective)()
        previous = self._grads.get(id(model))
        if previous is not None:
            grads = tree_map(mx.add, previous, grads)
        mx.eval(value, grads)
        self._grads[id(model)] = grads
        return float(value.item()), metrics

    def _checkpointed_value_and_grad(self, model, batch, loss_fn, metrics: dict):
        """The chunked step in two passes, so that gradient checkpointing saves memory.

        Under one value_and_grad the chunked loss and its metrics evaluate arrays inside the
        differentiated function, and mlx then keeps every traced intermediate alive,
        mx.checkpoint's included. Here the student's forward runs once untraced, the loss
        forms its gradient w.r.t. the hidden states (and a trainable head) in closed form,
        and one vjp of the forward with that cotangent gives the parameters' gradients:
        nothing is evaluated inside that trace, so the checkpointed blocks keep only their
        inputs. The price is a second forward of the student."""
        out = self.run_model(model, batch, True)
        hidden, head = mx.stop_gradient(out.hidden), out.head
        mx.eval(hidden)
        trains_head = not (head.quantized or head.frozen)

        def loss_of(h, *weight):
            found_value, found = loss_fn(Outputs(hidden=h, head=head.with_weight(weight[0]) if weight else head))
            metrics.update(found)
            return found_value

        args = (hidden, mx.stop_gradient(head.weight)) if trains_head else (hidden,)
        value, cotangents = mx.value_and_grad(loss_of, argnums=tuple(range(len(args))))(*args)
        if not isinstance(cotangents, (tuple, list)):  # mlx returns a one-argument gradient bare
            cotangents = (cotangents,)
        names, arrays = zip(*tree_flatten(model.trainable_parameters()))

        def forward(*params):
            model.update(tree_unflatten(list(zip(names, params))))
            again = self.run_model(model, batch, True)
            return (again.hidden, again.head.weight) if trains_head else (again.hidden,)

        _, grads = mx.vjp(forward, list(arrays), list(cotangents))
        model.update(tree_unflatten(list(zip(names, arrays))))
        return value, tree_unflatten(list(zip(names, grads)))

    def _compiles(self, model, loss_fn) -> bool:
        """Whether this step runs compiled (backends/mlx/compiled.py): --compile on, a loss
        whose inputs are in view, and positions that fit one chunk. `auto` (the default, which
        compiles torch on CUDA) stays uncompiled on mlx until the compiled step has been
        measured on Apple silicon."""
        from hpd.backends.mlx import compiled

        if getattr(self.config, "compile", "off") != "on":
            return False
        if not (hasattr(loss_fn, "objectives") and hasattr(loss_fn, "teacher")):
            return False
        targets = np.asarray(loss_fn.targets)
        vocab = self.vocab_size(model)
        return compiled.fits(loss_fn, int(((targets >= 0) & (targets < vocab)).sum()), vocab)

    def step_metrics(self) -> dict[str, float]:
        return {}

    def _compiled_forward_backward(self, model, batch, loss_fn):
        from hpd.backends.mlx.compiled import CompiledStep, metrics_of

        step = self._steps.get(id(model))
        if step is None:
            step = self._steps[id(model)] = CompiledStep(self, model)
        value, grads, raw, count = step(batch, loss_fn)
        previous = self._grads.get(id(model))
        if previous is not None:
            grads = tree_map(mx.add, previous, grads)
        mx.eval(value, grads, raw[1])  # metrics are arrays until here, evaluated with the step
        self._grads[id(model)] = grads
        return float(value.item()), metrics_of(loss_fn, raw, float(count))

    # ------------------------------------------------------------------ optimisation
    def make_optimizer(self, model, config):
        """torch.optim.AdamW as TorchBackend configures it: bias-corrected, decoupled weight
        decay on >= 2-D parameters only."""
        def adamw(weight_decay: float):
            return optim.AdamW(learning_rate=config.lr, betas=[config.adam_beta1, config.adam_beta2],
                               eps=config.adam_eps, weight_decay=weight_decay, bias_correction=True)

        return optim.MultiOptimizer([adamw(config.weight_decay), adamw(0.0)],
                                    filters=[lambda path, g: g.ndim >= 2])

    def optimizer_step(self, model, optimizer, lr: float, max_grad_norm: float) -> float:
        grads = self._grads.pop(id(model), None)
        if grads is None:
            raise RuntimeError("optimizer_step without gradients: call forward_backward first")
        if self.world_size > 1:
            # each rank's loss is already divided by the global token count: sum, not average
            grads = tree_map(lambda g: mx.distributed.all_sum(g, group=self.group), grads)
        if max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = mx.sqrt(tree_reduce(lambda acc, g: acc + mx.sum(mx.square(g.astype(mx.float32))), grads, 0.0))
        mx.eval(norm)
        if not math.isfinite(float(norm.item())):  # a NaN/Inf gradient is never applied
            return float(norm.item())
        optimizer.learning_rate = lr
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, norm)
        return float(norm.item())

    def weights_finite(self, model) -> bool:
        """No NaN or Inf in this process's weights."""
        flags = [mx.all(mx.isfinite(v)) for _, v in tree_flatten(model.parameters())]
        return bool(mx.all(mx.array(flags)).item()) if flags else True

    def zero_grad(self, model, optimizer) -> None:
        self._grads.pop(id(model), None)

    def all_reduce_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        return float(mx.distributed.all_sum(mx.array(value, dtype=mx.float32), group=self.group).item())

    def barrier(self) -> None:
        if self.world_size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    # ------------------------------------------------------------------ generation
    def generate(self, model, tokenizer, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, greedy: bool = False):
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, greedy=greedy)

    # ------------------------------------------------------------------ state
    def full_weights(self, model) -> dict[str, mx.array]:
        from hpd.models.lora import attached

        if attached(model) is not None:
            return self.lora.merged_weights(model)
        return dict(tree_flatten(model.parameters()))

    def save_model(self, model, tokenizer, folder: Path) -> None:
        from mlx_lm.utils import save_config

        from hpd.models.export import fix_config, write_generation_config

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        family.save_weights(folder, model)
        config = json.loads(json.dumps(info_of(model).config))  # save_config mutates its argument
        dtypes = {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
        if len(dtypes) == 1 and (name := DTYPE_NAMES.get(dtypes.pop())):
            config["dtype"] = name  # what the files hold, so transformers does not cast on load
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        save_config(config, folder / "config.json")
        tokenizer.save_pretrained(folder)
        fix_config(folder)
        write_generation_config(folder, tokenizer)

    def save_training_state(self, model, optimizer, folder: Path) -> None:
        folder = Path(folder)
        arrays = dict(tree_flatten(optimizer.state))
        mx.eval(arrays)
        mx.save_safetensors(str(folder / "optimizer.safetensors"), arrays, metadata={"format": "mlx"})
        meta = {"format": _STATE_FORMAT, "backend": self.name, "optimizer": "AdamW",
                "groups": [{"weight_decay": float(o.weight_decay), "betas": [float(b) for b in o.betas],
                            "eps": float(o.eps)} for o in optimizer.optimizers]}
        (folder / "optimizer.json").write_text(json.dumps(meta, indent=2) + "\n")

    def load_training_state(self, model, optimizer, folder: Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "optimizer.json").read_text())
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{folder} holds optimizer state of another backend "
                             f"({meta.get('backend', 'torch')}); resume it with that backend")
        arrays = mx.load(str(folder / "optimizer.safetensors"))
        optimizer.state = tree_unflatten(list(arrays.items()))
        self._grads.pop(id(model), None)

    def rng_state(self) -> dict[str, np.ndarray]:
        return {"mlx": np.array(mx.random.state[0], dtype=np.uint32), **host_rng_state()}

    def set_rng_state(self, state: dict[str, np.ndarray]) -> None:
        if "mlx" not in state:
            raise ValueError(f"the RNG state holds {sorted(state)}, not an mlx key: written by another backend")
        # mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff): any key can be restored
        hi, lo = (int(x) for x in np.asarray(state["mlx"], dtype=np.uint32))
        mx.random.seed((hi << 32) | lo)
        set_host_rng_state(state)


