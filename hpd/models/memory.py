"""The memory plan: what one training step holds at its peak, from the models' config.json
alone (no weights are read), per part and per backend. `hpd distill --dry-run` prints it.

Parts, in bytes:
- weights: every parameter at its dtype; a quantized layer (mlx affine: every linear and
  embedding layer, group 64) at bits/8 per weight plus a scale and a bias per group;
- gradients and optimizer state: float32, one and two copies (AdamW) of the trainable
  parameters (the whole student, or the LoRA adapters);
- activations: what the student's forward keeps for its backward, counted op by op for the
  Llama/Qwen2 block (mlx-lm and transformers run the same ops); under gradient
  checkpointing the blocks' inputs plus one block's worth, recomputed;
- the teacher's forward output (its final hidden states, or logits on the plain path);
- the loss: on the chunked path a few (chunk, vocabulary) float32 buffers plus the
  hidden- and head-sized copies and gradients the chunked loss forms; on the plain path
  (batch x length x vocabulary) float32 arrays for both models.

`benchmarks/memory_plan.py` measures one step's peak on models of the published Qwen2.5
shapes and prints it beside this estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hpd.objectives.chunked import DEFAULT_CHUNK_BUDGET_MB, resolve_chunk_budget

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# float32 (chunk, V) arrays alive at once in one chunk of the chunked loss (counted in
# hpd.objectives.chunked, which sizes auto chunks by the same number).
_CHUNK_BUFFERS = 6
# float32 (B, T, V) arrays on the plain path: both models' logits and log-softmaxes,
# the rule's weights and the logit gradient.
_PLAIN_BUFFERS = 6


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Llama / Qwen2 family) as its config.json describes it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(hidden=hidden, intermediate=int(config["intermediate_size"]),
                   layers=int(config["num_hidden_layers"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", False)),
                   qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))

    @classmethod
    def from_folder(cls, path: str) -> Shape:
        from hpd.models.loading import local_or_hub

        source = local_or_hub(path)
        if not isinstance(source, Path):
            from huggingface_hub import hf_hub_download

            source = Path(hf_hub_download(source, "config.json")).parent
        return cls.from_config(json.loads((source / "config.json").read_text()))

    def linears(self) -> list[tuple[str, int, int]]:
        """(leaf name, in, out) of one block's linear layers."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def block_matrix_params(self) -> int:
        return sum(a * b for _, a, b in self.linears())

    def block_vector_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return bias + 2 * self.hidden  # two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        blocks = self.layers * (self.block_matrix_params() + self.block_vector_params())
        return blocks + self.embedding_params() + self.hidden

    def lora_params(self, rank: int, targets: str = "all-linear") -> int:
        wanted = None if targets == "all-linear" else set(targets.split(","))
        return self.layers * sum(rank * (a + b) for name, a, b in self.linears()
                                 if wanted is None or name in wanted)


def weight_bytes(shape: Shape, dtype_bytes: int, bits: int = 0, backend: str = "mlx") -> int:
    """Every parameter at `dtype_bytes`; with `bits`, every matrix (linear layers, embedding,
    head) packed at bits/8 bytes per weight plus a scale and a bias per group, as
    hpd.backends.mlx.loading.quantize_model does (group 64, or 32 where the width needs it).
    bitsandbytes (torch) quantizes the blocks' linear layers only, with one float32 absmax
    per 64 weights."""
    matrices = [(n_in, n_out) for _, n_in, n_out in shape.linears()] * shape.layers
    embeddings = [(shape.hidden, shape.vocab)] * (1 if shape.tied else 2)
    vectors = shape.layers * shape.block_vector_params() + shape.hidden
    total = vectors * dtype_bytes
    if bits and backend == "torch":
        dense = sum(a * b for a, b in embeddings) * dtype_bytes
        return total + dense + sum(a * b * bits // 8 + (a * b // 64) * 4 for a, b in matrices)
    matrices += embeddings
    for n_in, n_out in matrices:
        group = next((g for g in (64, 32) if n_in % g == 0), 0) if bits else 0
        if group:
            total += n_in * n_out * bits // 8 + 2 * (n_in // group) * n_out * dtype_bytes
        else:
            total += n_in * n_out * dtype_bytes
    return total


def block_activations(shape: Shape, tokens: int, dtype_bytes: int, lora_rank: int = 0,
                      targets: str = "all-linear", backend: str = "torch") -> int:
    """Bytes one block's forward keeps for the backward (every intermediate of the block:
    under autodiff mlx keeps a traced array's inputs alive, and torch saves the same ones).

    Per token: the two norms' outputs, q/k/v, rotated q/k, the attention output and its
    transposed copy, o_proj, the residual sums, gate, up, the SwiGLU product and down_proj.
    A LoRA layer adds x @ A (rank) and, per output feature, what its branch keeps:
    - torch (peft) and a float32 base on mlx: the float32 product with B, the scaled copy,
      and the cast and the sum (12 bytes per output feature and token either way);
    - mlx beside a half-precision base: hpd.backends.mlx.lora computes the branch in the base's
      dtype. benchmarks/mlx_lora_branch.py measures its step's peak 4.0-4.3 bytes per output
      feature and token below mlx-lm's own LoRALinear (bfloat16, whole model); the plan
      counts 8 bytes (4 x the dtype), the 12 above less what was measured.
    The attention's (heads, T, T) scores are not kept: its backward recomputes them
    (see attention_scores).
    """
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    per_token = (6 * h + (4 * shape.heads + 3 * shape.kv_heads) * d + 3 * i) * dtype_bytes
    if lora_rank:
        wanted = None if targets == "all-linear" else set(targets.split(","))
        outs = sum(out for name, _, out in shape.linears() if wanted is None or name in wanted)
        adapted = sum(1 for name, _, _ in shape.linears() if wanted is None or name in wanted)
        if backend == "mlx" and dtype_bytes < 4:
            per_token += adapted * lora_rank * dtype_bytes + outs * 4 * dtype_bytes
        else:
            per_out = 2 * 4 + (dtype_bytes if dtype_bytes == 4 else 2 * dtype_bytes)
            per_token += adapted * lora_rank * 4 + outs * per_out
    return per_token * tokens


def attention_scores(shape: Shape, batch: int, length: int) -> int:
    """The float32 scores and probabilities (B, heads, T, T) that one block's attention
    backward recomputes: one block at a time."""
    return 2 * batch * shape.heads * length * length * 4


# vLLM's KV cache blocks, in tokens: its CPU build's, and its GPU builds' default
ENGINE_BLOCK = {"cpu": 128, "cuda": 16}
# A colocated vLLM rollout engine besides its KV cache, measured on the CPU build with a 101M
# Llama (384 MiB of float32 weights, docs/memory-plan.md): its own copy of the weights (repacked
# for its kernels) and what its weight loads keep, 1.4-2.0x the weights (with the engine's fixed
# ~0.1 GB, at the highest point after up to 6 loads); the runtime (`import vllm` 0.5 GB, that 0.1 GB).
ENGINE_WEIGHT_COPIES = 2.0
ENGINE_RUNTIME = 600 * 2**20


def kv_cache_bytes(shape: Shape, dtype_bytes: int, tokens: int) -> int:
    """An inference engine's KV cache for `tokens` tokens: a key and a value per layer,
    KV head and head dimension."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes * tokens


def sequence_kv_bytes(shape: Shape, dtype_bytes: int, max_model_len: int, block: int, sequences: int = 1) -> int:
    """The KV cache that holds `sequences` sequences of max_model_len tokens, in whole blocks."""
    return kv_cache_bytes(shape, dtype_bytes, sequences * -(-max_model_len // block) * block)


@dataclass
class Setting:
    """One run's memory-relevant choices (the fields of hpd.train.config.DistillConfig)."""

    backend: str = "mlx"
    batch: int = 1
    length: int = 2048
    student_dtype: int = 4  # bytes
    teacher_dtype: int = 4
    teacher_bits: int = 0
    student_bits: int = 0
    lora_rank: int = 0
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False
    chunked: bool = True
    chunk_size: int | str = "auto"
    chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB  # hpd distill's default
    # a half-precision dense head forms float32 logits as stored, never cast to a float32
    # copy (hpd.objectives.heads.half_logits: torch on CUDA)
    half_logits: bool = False
    # --rollout-engine vllm: the engine's KV cache in bytes (0: no engine) and its weights' dtype
    engine_kv: int = 0
    engine_dtype: int = 4


def plan(teacher: Shape | dict[str, Shape], student: Shape, s: Setting, *, offload: bool = False
         ) -> list[tuple[str, int]]:
    """[(part, bytes)] for one training step's peak; the last entry is the total.

    `teacher`: its shape, or {name: shape} for named teachers (each scores its own rows:
    a batch's teacher outputs are at most the widest teacher's over every token); with
    `offload`, only one teacher's weights are in memory at a time."""
    teachers = teacher if isinstance(teacher, dict) else {"": teacher}
    teacher = max(teachers.values(), key=lambda t: (t.hidden, t.vocab))  # the widest outputs
    tokens = s.batch * s.length
    vocab = min(student.vocab, *(t.vocab for t in teachers.values()))
    trainable = student.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else student.params()
    act_dtype = s.student_dtype
    block = block_activations(student, tokens, act_dtype, s.lora_rank, s.lora_targets, s.backend)
    # the backward of a block forms a cotangent beside each of its intermediates: one
    # block's worth more while it runs (with checkpointing, beside the recomputed block).
    # mlx checkpoints through a two-pass step (an untraced forward, then one vjp), so the
    # traced forward keeps only the blocks' inputs, as torch's does. mlx's vjp frees each
    # cotangent once used: at its peak the recomputed block and half a block's cotangents
    # (fitted to the 512- and 2048-token checkpointed points of docs/memory-plan.md)
    checkpointed = s.gradient_checkpointing
    if checkpointed:
        working = 3 * block // 2 if s.backend == "mlx" else 2 * block
        activations = student.layers * tokens * student.hidden * act_dtype + working
    else:
        activations = (student.layers + 1) * block
    activations += 2 * tokens * student.hidden * act_dtype  # embedding output, final norm
    activations += attention_scores(student, s.batch, s.length)
    parts = teacher_weights(teachers, s, offload)
    parts.append(("student weights", weight_bytes(student, s.student_dtype, s.student_bits, s.backend)))
    if s.lora_rank:
        parts.append(("LoRA adapters (float32)", 4 * trainable))
    parts += [("gradients (float32)", 4 * trainable), ("optimizer state (AdamW, float32)", 8 * trainable),
              ("student activations" + (" (checkpointed)" if checkpointed else ""), activations)]
    if s.chunked:
        parts.append(("teacher hidden states", tokens * teacher.hidden * s.teacher_dtype))
        parts.append(("loss: chunk buffers", chunk_buffers(s, tokens, vocab, teacher, student)))
        parts.append(("loss: hidden and head copies", loss_copies(teacher, student, s, tokens, vocab)))
    else:
        parts.append(("teacher logits", tokens * vocab * s.teacher_dtype))
        parts.append(("loss: logits buffers", _PLAIN_BUFFERS * tokens * vocab * 4))
    total = sum(b for _, b in parts)
    if two_pass(s):
        # the loss runs on the untraced forward's hidden states and frees its buffers before
        # the vjp recomputes the blocks: the peak is the larger of the two phases
        loss = sum(b for name, b in parts if name.startswith("loss:")) - head_gradient(student, s, vocab)
        total -= min(activations, loss)
    if s.engine_kv:
        parts += engine_parts(student, s)
        total += sum(b for _, b in parts[-3:])
    parts.append(("total", total))
    return parts


def engine_parts(student: Shape, s: Setting) -> list[tuple[str, int]]:
    """A vLLM rollout engine in the training process (hpd.train.rollout_vllm)."""
    copies = int(ENGINE_WEIGHT_COPIES * weight_bytes(student, s.engine_dtype, backend="torch"))
    return [("rollout engine: weights and loads", copies), ("rollout engine: KV cache", s.engine_kv),
            ("rollout engine: vLLM runtime", ENGINE_RUNTIME)]


def teacher_weights(teachers: dict[str, Shape], s: Setting, offload: bool) -> list[tuple[str, int]]:
    sizes = {name: weight_bytes(t, s.teacher_dtype, s.teacher_bits, s.backend) for name, t in teachers.items()}
    if list(sizes) == [""]:
        return [("teacher weights", sizes[""])]
    if offload:
        largest = max(sizes, key=sizes.get)
        return [(f"teacher weights (offload: {largest})", sizes[largest])]
    return [(f"teacher {name} weights", size) for name, size in sizes.items()]


def two_pass(s: Setting) -> bool:
    """mlx's checkpointed chunked step (hpd.backends.mlx.backend): an untraced forward, the
    loss's gradient on the hidden states, then one vjp of the forward."""
    return s.backend == "mlx" and s.gradient_checkpointing and s.chunked


def chunk_positions(s: Setting, vocab: int) -> int:
    """Positions per chunk, as hpd.objectives.chunked.resolve_chunk_size picks them."""
    if str(s.chunk_size) != "auto":
        return int(s.chunk_size)
    return max(16, int(s.chunk_budget_mb * 2**20 // (_CHUNK_BUFFERS * vocab * 4)))


def chunk_buffers(s: Setting, tokens: int, vocab: int, teacher: Shape | None = None,
                  student: Shape | None = None) -> int:
    """The chunk's (C, V) float32 arrays; a quantized head with more rows than the shared
    vocabulary (Qwen2.5-7B's 152064 against 151936) yields full-width logits that are then
    cut, one more (C, V) array (measured: 7.0 instead of 6.0 per position)."""
    buffers = _CHUNK_BUFFERS
    buffers += bool(s.teacher_bits and teacher is not None and teacher.vocab > vocab)
    buffers += bool(s.student_bits and student is not None and student.vocab > vocab)
    return buffers * min(chunk_positions(s, vocab), tokens) * vocab * 4


def loss_copies(teacher: Shape, student: Shape, s: Setting, tokens: int, vocab: int) -> int:
    """What the chunked loss holds besides its chunks: the supervised positions' hidden
    states (gathered, copied off the graph) and their float32 gradient (per chunk, then
    joined); a trainable dense head's copy and float32 gradient (twice while a chunk's part
    is added); a dense head stored below float32, cast once (not where it forms float32
    logits as stored: Setting.half_logits). A quantized or frozen head
    forms no gradient, and a quantized one is never cast."""
    hs, ht = student.hidden, teacher.hidden
    total = tokens * (2 * hs * s.student_dtype + 2 * hs * 4 + ht * s.teacher_dtype)
    if not s.student_bits:
        if not s.lora_rank:
            total += vocab * hs * (s.student_dtype + 2 * 4)
            if s.backend == "mlx" and student.tied:
                # mlx forms the embedding's own (scatter) gradient and adds the head's to it;
                # torch accumulates a tied weight's gradient in place
                total += vocab * hs * 4
        if s.student_dtype != 4 and not s.half_logits:
            total += vocab * hs * 4
    if not s.teacher_bits and s.teacher_dtype != 4 and not s.half_logits:
        total += vocab * ht * 4
    return total


def head_gradient(student: Shape, s: Setting, vocab: int) -> int:
    """The part of loss_copies that outlives the loss: a trainable dense head's float32
    gradient (and on mlx a tied embedding's own), kept for the optimizer step."""
    if s.student_bits or s.lora_rank:
        return 0
    return vocab * student.hidden * 4 * (2 if s.backend == "mlx" and student.tied else 1)


def trainable_count(student: Shape, s: Setting) -> tuple[int, int]:
    trainable = student.lora_params(s.lora_rank, s.lora_targets) if s.lora_rank else student.params()
    return trainable, student.params() + (trainable if s.lora_rank else 0)


def _accelerated(backend: str, device: str) -> bool:
    """Whether --dtype auto would put frozen models in bfloat16 here (Metal or CUDA)."""
    try:
        if backend == "mlx":
            import mlx.core as mx

            return mx.default_device().type == mx.DeviceType.gpu
        if device in ("cuda", "mps"):
            return device == "cuda"
        import torch

        return device == "auto" and torch.cuda.is_available()
    except ImportError:
        return False


def _cuda(device: str) -> bool:
    """Whether the torch backend would run on CUDA (where hpd.objectives.heads.half_logits is on)."""
    if device == "cuda":
        return True
    if device != "auto":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def setting_of(cfg, backend: str | None = None) -> Setting:
    backend = backend or cfg.backend
    auto_frozen = 2 if _accelerated(backend, cfg.device) else 4  # --dtype auto: bfloat16 frozen models

    def dtype(frozen: bool) -> int:
        if cfg.dtype != "auto":
            return _BYTES[cfg.dtype]
        return auto_frozen if frozen else 4

    engine_dtype = 4 if cfg.dtype == "auto" else _BYTES[cfg.dtype]
    return Setting(backend=backend, batch=cfg.batch_size, length=cfg.max_length,
                   student_dtype=dtype(bool(cfg.lora_rank)), teacher_dtype=dtype(True),
                   teacher_bits=cfg.teacher_quantize, student_bits=cfg.student_quantize,
                   lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets,
                   gradient_checkpointing=cfg.gradient_checkpointing, chunked=cfg.chunked != "off",
                   chunk_size=cfg.chunk_size,
                   chunk_budget_mb=resolve_chunk_budget(cfg.chunk_budget_mb, backend == "torch" and _cuda(cfg.device)),
                   half_logits=backend == "torch" and _cuda(cfg.device),
                   engine_kv=engine_kv_bytes(cfg, engine_dtype) if backend == "torch" else 0,
                   engine_dtype=engine_dtype)


def engine_kv_bytes(cfg, dtype_bytes: int) -> int:
    """--rollout-engine vllm: the KV cache asked for, or its default (one micro-batch of
    max_model_len sequences, in whole blocks); 0 without an engine."""
    if getattr(cfg, "rollout_engine", "hf") != "vllm":
        return 0
    if cfg.rollout_kv_cache_mb:
        return cfg.rollout_kv_cache_mb * 2**20
    block = ENGINE_BLOCK["cuda" if _cuda(cfg.device) else "cpu"]
    need = sequence_kv_bytes(Shape.from_folder(cfg.student), dtype_bytes, cfg.rollout_max_model_len or cfg.max_length,
                             block, cfg.batch_size)
    return 2**20 * -(-need // 2**20)


def gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**30 else f"{n / 2**20:8.1f} MiB"


def format_plan(teacher: Shape | dict[str, Shape], student: Shape, s: Setting, *, offload: bool = False) -> str:
    trainable, total = trainable_count(student, s)
    lines = [f"memory plan ({s.backend}, batch {s.batch} x {s.length} tokens, "
             f"{'chunked' if s.chunked else 'plain'} loss"
             f"{', gradient checkpointing' if s.gradient_checkpointing else ''}):",
             f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"]
    lines += [f"  {name:<36} {gib(b)}" for name, b in plan(teacher, student, s, offload=offload)]
    if two_pass(s):
        lines.append("  (two-pass checkpointed step: the loss's buffers are freed before the backward, "
                     "so the total counts the larger of the two)")
    return "\n".join(lines)


def dry_run(cfg) -> str:
    """`hpd distill --dry-run`: the plan for the run's backend (and the other one, where it
    can run the same configuration), from the two config.json files; nothing is loaded or
    written."""
    served = [t for t in (cfg.teacher, *cfg.teachers.values()) if str(t).lower().startswith(("http://", "https://"))]
    if served:
        raise ValueError(f"--dry-run plans the teacher's model in this process; {served[0]} is a served teacher, "
                         "whose memory is the server's (docs/scale.md)")
    if cfg.teacher_names():  # every named teacher with a model in memory (a store's rows are small)
        teacher = {name: Shape.from_folder(path) for name, path in sorted(cfg.teachers.items())}
        if not teacher:
            raise ValueError("--dry-run plans the teachers' models; these named teachers are stores only")
    else:
        teacher = Shape.from_folder(cfg.teacher)
    student = Shape.from_folder(cfg.student)
    backends = [cfg.backend] + [b for b in ("mlx", "torch") if b != cfg.backend]
    out = []
    for backend in backends:
        if backend == "torch" and cfg.teacher_quantize:
            continue  # the torch backend quantizes no teacher
        out.append(format_plan(teacher, student, setting_of(cfg, backend), offload=cfg.teacher_offload))
    return "\n\n".join(out)
