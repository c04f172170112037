"""The mlx student step under mx.compile: forward, objective and backward in one graph.

The uncompiled step (MlxBackend.forward_backward) finds the supervised positions with a
host round trip and reads its metrics as Python floats inside the differentiated
function, which mx.compile cannot trace. Here the host does that work before the call:
the flat indices of the supervised positions are computed from the numpy-free targets
once, padded to a bucket, and passed in as an input with a validity mask; the metrics
come back as arrays (the MetricTally sums, counts and extremes) and become floats after
the step. So the compiled function sees only arrays of a few shapes:

    input ids (B, T)          T padded up to a bucket (right padding changes nothing before it)
    index, valid (N,)         N, the supervised positions, padded up to a bucket
    targets, samples or uniforms (N,)
    teacher rows (N, H_t) and its head, or teacher logits (N, V)
    num_tokens ()             an array, so the global token count never forces a recompile

Buckets are a quarter of an octave apart (n rounded up to a multiple of 2**floor(log2 n) / 4),
so lengths and position counts vary freely at the cost of a handful of compilations and
at most 25% padding. The logits are formed for the N rows at once, not in chunks, so the
compiled step serves batches whose supervised positions fit one chunk of the chunk byte
budget; larger ones take the chunked, uncompiled path. Samples come from the step's keyed
uniforms or given samples; without them the framework RNG's state is an input and an output
of the compiled function (otherwise every call would reuse one key).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hpd.objectives.chunked import CHUNK_BUFFERS
from hpd.objectives.heads import project
from hpd.objectives.losses import MetricTally, objective_terms, student_sample, weighted_objectives
from hpd.objectives.ops import ops_for
from hpd.objectives.rules import get_method, resolve_params
from hpd.objectives.teacher import LiveTeacher, LogitsTeacher

IGNORE = -100


def bucket(n: int, smallest: int = 16) -> int:
    """n rounded up to a quarter-octave step (at least `smallest`)."""
    n = max(int(n), smallest)
    step = max(1, (1 << (n.bit_length() - 1)) // 4)
    return -(-n // step) * step


def fits(loss, batch_positions: int, vocab: int) -> bool:
    """Whether the compiled step can serve this loss: a live or logits teacher, and the
    supervised positions' (N, V) buffers within one chunk's byte budget."""
    if not isinstance(loss.teacher, (LiveTeacher, LogitsTeacher)):
        return False
    return bucket(batch_positions) * vocab * 4 * CHUNK_BUFFERS <= loss.chunk_budget_mb * 2**20


class CompiledStep:
    """Compiled (value, grads, metric arrays) of a student step, one compilation per
    (objectives, temperature, input kinds); mx.compile adds one per new input shape."""

    def __init__(self, backend, model):
        self.backend, self.model = backend, model
        self._fns: dict = {}

    def __call__(self, batch: dict, loss) -> tuple[mx.array, dict, list, int]:
        """(loss value, gradients, raw metric arrays, supervised positions), unevaluated."""
        targets = np.asarray(loss.targets).astype(np.int64)
        vocab = min(self.backend.vocab_size(self.model), loss.teacher.vocab)
        flat = np.flatnonzero((targets.reshape(-1) >= 0) & (targets.reshape(-1) < vocab))
        b, t = targets.shape
        t_pad, n_pad = bucket(t), bucket(len(flat))
        index = np.zeros(n_pad, dtype=np.int32)
        index[:len(flat)] = (flat // t) * t_pad + flat % t  # positions in the padded (B, T_pad) grid
        valid = np.zeros(n_pad, dtype=bool)
        valid[:len(flat)] = True
        idx = mx.array(index)
        inputs = {"input_ids": _pad_tokens(batch["input_ids"], t_pad), "index": idx, "valid": mx.array(valid),
                  "targets": mx.where(mx.array(valid), _rows(loss.targets, t_pad, idx), 0),
                  "num_tokens": mx.array(float(loss.num_tokens), dtype=mx.float32)}
        if "block_mask" in batch:
            inputs["block_mask"] = _pad_mask(batch["block_mask"], t_pad)
        if loss.sampled is not None:
            inputs["sampled"] = _rows(loss.sampled, t_pad, idx)
        elif loss.uniforms is not None:
            inputs["uniforms"] = _rows(mx.array(np.asarray(loss.uniforms, dtype=np.float32)), t_pad, idx)
        teacher = loss.teacher
        if isinstance(teacher, LiveTeacher):
            inputs["teacher_hidden"] = _rows(teacher.hidden, t_pad, idx)
            inputs["teacher_head"] = teacher.head.weight
            if teacher.head.quantized:
                inputs["teacher_scales"], inputs["teacher_biases"] = teacher.head.scales, teacher.head.biases
        else:
            inputs["teacher_logits"] = _rows(teacher.logits, t_pad, idx)
        head = teacher.head if isinstance(teacher, LiveTeacher) else None
        structure = None if head is None else (head.scale, head.softcap, head.bits, head.group_size)
        key = (tuple((o.method, o.weight, tuple(sorted(o.params.items()))) for o in loss.objectives),
               float(loss.temperature), tuple(sorted(inputs)), structure)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._build(loss, head)
        value, grads, raw = fn(inputs)
        return value, grads, raw, len(flat)

    def _build(self, loss, teacher_head):
        backend, model = self.backend, self.model
        temperature = float(loss.temperature)
        state = [model.state, mx.random.state]
        layout: list = []  # (objective, tally part, name) of each stacked metric, set when traced

        def objective(inputs):
            o = ops_for(inputs["num_tokens"])
            out = backend.run_model(model, {k: v for k, v in inputs.items() if k in ("input_ids", "block_mask")},
                                    hidden=True)
            hidden = out.hidden.reshape((-1, out.hidden.shape[-1]))[inputs["index"]]  # (N, H)
            head = out.head
            vocab = head.vocab
            if "teacher_logits" in inputs:
                lp_source = LogitsTeacher(inputs["teacher_logits"])
            else:
                weight = inputs["teacher_head"]
                th = teacher_head.with_weight(weight)
                if th.quantized:
                    th = _with_quant(th, inputs)
                lp_source = LiveTeacher(inputs["teacher_hidden"], th)
            vocab = min(vocab, lp_source.vocab)
            zs, _ = project(o, head, hidden, vocab, temperature, dtype=mx.float32)  # (N, V), tempered
            lp = lp_source.log_probs(o, slice(None), vocab, temperature, mx.float32)
            y, valid = inputs["targets"], inputs["valid"]

            def term(obj):
                m = get_method(obj.method)
                s = student_sample(o, m, zs, inputs.get("sampled"), inputs.get("uniforms"))
                per_pos, w, lq_y, kl = objective_terms(o, m, zs, lp, y, s, resolve_params(m, obj.params))
                tally = MetricTally(o, m, mx.float32, zs)
                tally.add(w, lq_y, valid, kl)
                return mx.sum(mx.where(valid, per_pos, 0.0)) / inputs["num_tokens"], tally

            total, tallies = weighted_objectives(loss.objectives, term)
            raw = [((i, part, name), x) for i, tally in enumerate(tallies)
                   for part in ("sums", "counts", "lows", "highs") for name, x in getattr(tally, part).items()]
            # one stacked output: separate outputs that compile's common-subexpression pass
            # merges (each objective's nll, say) would be one array returned twice
            layout[:] = [key for key, _ in raw]
            return total, mx.stack([x.astype(mx.float32) for _, x in raw])

        value_and_grad = nn.value_and_grad(model, objective)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(inputs):
            (value, raw), grads = value_and_grad(inputs)
            return value, grads, raw

        def run(inputs):
            value, grads, raw = step(inputs)
            return value, grads, (layout, raw)

        return run


def metrics_of(loss, raw, count: float) -> dict[str, float]:
    """The Python-float metrics of an evaluated step, as hpd.loss reports them."""
    from hpd.objectives.losses import metric_names

    layout, values = raw
    values = np.array(values).tolist()
    parts = [{"sums": {}, "counts": {}, "lows": {}, "highs": {}} for _ in loss.objectives]
    for (i, part, name), v in zip(layout, values):
        parts[i][part][name] = mx.array(v)
    out: dict[str, float] = {}
    for obj, found in zip(loss.objectives, parts):
        tally = MetricTally(ops_for(found["sums"]["objective"]), get_method(obj.method), mx.float32,
                            found["sums"]["objective"])
        tally.sums, tally.counts = found["sums"], found["counts"]
        tally.lows, tally.highs = found["lows"], found["highs"]
        out.update(metric_names(tally.metrics(count), obj.method, len(loss.objectives)))
    return out


def _pad_tokens(ids: mx.array, width: int) -> mx.array:
    extra = width - ids.shape[1]
    return ids if extra == 0 else mx.pad(ids, [(0, 0), (0, extra)])


def _rows(x, width: int, index: mx.array):
    """x (B, T, ...) padded along T to `width`, flattened over (B, T), at rows `index`."""
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
    extra = width - x.shape[1]
    if extra:
        x = mx.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((-1, *x.shape[2:]))[index]


def _pad_mask(mask: mx.array, width: int) -> mx.array:
    """A packed batch's (B, 1, T, T) mask widened to `width`; each padded position sees
    itself only (a row that sees nothing would put NaN into the attention)."""
    extra = width - mask.shape[-1]
    if extra == 0:
        return mask
    mask = mx.pad(mask, [(0, 0), (0, 0), (0, extra), (0, extra)])
    pad_eye = mx.arange(width) >= width - extra
    return mask | (mx.eye(width, dtype=mx.bool_) & pad_eye[:, None])


def _with_quant(head, inputs):
    from dataclasses import replace

    return replace(head, scales=inputs["teacher_scales"], biases=inputs["teacher_biases"])


__all__ = ["CompiledStep", "bucket", "fits", "metrics_of"]
