"""A minimal array-ops shim so that the objectives run on torch tensors and mlx arrays.

Arithmetic, comparisons and `&`/`|` work the same on both frameworks, so the shim
only covers what is spelled differently. The framework is chosen from the array's
type; neither torch nor mlx is imported until an array of theirs arrives.
"""

from __future__ import annotations

from typing import Any

# Log-probabilities are floored here before they meet a zero probability: exp(-1e4)
# is 0 in every float format, so no value changes, but 0 * (-inf) can no longer
# produce NaN where the vocabulary is masked with -inf logits.
LOG_FLOOR = -1e4


class TorchOps:
    name = "torch"

    def __init__(self):
        import torch

        self.t = torch

    def is_array(self, x) -> bool:
        return isinstance(x, self.t.Tensor)

    def compute_dtype(self, x):
        return self.t.float64 if x.dtype == self.t.float64 else self.t.float32

    def astype(self, x, dtype):
        return x.to(dtype)

    def float_dtype(self, x):
        return x.dtype

    def int_array(self, x):
        return x.long()

    def log_softmax(self, x):
        return self.t.log_softmax(x, dim=-1)

    def logsumexp(self, x):
        return self.t.logsumexp(x, dim=-1)

    def exp(self, x):
        return self.t.exp(x)

    def log(self, x):
        return self.t.log(x)

    def logaddexp(self, x, y):
        return self.t.logaddexp(x, y)

    def sigmoid(self, x):
        return self.t.sigmoid(x)

    def sign(self, x):
        return self.t.sign(x)

    def abs(self, x):
        return self.t.abs(x)

    def maximum(self, x, value):
        if not self.is_array(value):
            value = self.t.tensor(value, dtype=x.dtype, device=x.device)
        return self.t.maximum(x, value)

    def where(self, cond, x, y):
        return self.t.where(cond, x, y)

    def sum(self, x, axis=None):
        return x.sum() if axis is None else x.sum(dim=axis)

    def max(self, x):
        return x.max()

    def min(self, x):
        return x.min()

    def cumsum(self, x):
        return self.t.cumsum(x, dim=-1)

    def argsort_desc(self, x):
        return self.t.argsort(x, dim=-1, descending=True)

    def sort_desc(self, x):
        """x sorted along the last axis, largest first."""
        return self.t.sort(x, dim=-1, descending=True).values

    def columns(self, x, index):
        """x (N, V) at columns `index` (K,): (N, K)."""
        return x.index_select(-1, index)

    def take(self, x, idx):
        """x: (..., V), idx: (...) -> (...): x[..., idx]."""
        return self.t.gather(x, -1, idx.unsqueeze(-1)).squeeze(-1)

    def take_along(self, x, idx):
        """x: (..., V), idx: (..., K) -> (..., K)."""
        return self.t.gather(x, -1, idx)

    def put_along(self, x, idx, values):
        """x (..., V) with values (..., K) written at idx (..., K); a new array."""
        return x.scatter(-1, idx, values)

    def top_k(self, x, k: int):
        """(values, ids) of the k largest along the last axis, largest first."""
        values, ids = self.t.topk(x, k, dim=-1)
        return values, ids

    def numpy(self, x):
        return x.detach().cpu().numpy()

    def put(self, shape_like, idx, values):
        """Zeros shaped like `shape_like` (..., V) with `values` (...) added at `idx` (...)."""
        out = self.t.zeros_like(shape_like)
        return out.scatter_add(-1, idx.unsqueeze(-1), values.unsqueeze(-1))

    def stop_gradient(self, x):
        return x.detach()

    def zeros_like(self, x):
        return self.t.zeros_like(x)

    def full_like(self, x, value):
        return self.t.full_like(x, value)

    def argmax(self, x):
        return x.argmax(dim=-1)

    def gumbel_like(self, x, generator=None):
        # -log(-log(U)) with U in (0, 1); torch.rand can return exactly 0.
        u = self.t.rand(x.shape, dtype=self.t.float32, device=x.device, generator=generator)
        tiny = self.t.finfo(self.t.float32).tiny
        return -self.t.log(-self.t.log(u.clamp(min=tiny, max=1.0 - 1e-7))).to(x.dtype)

    def item(self, x) -> float:
        return float(x.detach().item())

    def count(self, mask) -> float:
        return float(mask.sum().item())

    def shape(self, x) -> tuple[int, ...]:
        return tuple(x.shape)

    def no_grad(self):
        return self.t.no_grad()

    def zeros(self, shape, dtype, like):
        """Zeros of `shape` and `dtype` on the device of array `like`."""
        return self.t.zeros(tuple(shape), dtype=dtype, device=like.device)

    def concat(self, xs, axis=0):
        return self.t.cat(list(xs), dim=axis)

    def tanh(self, x):
        return self.t.tanh(x)

    def itemsize(self, dtype) -> int:
        return dtype.itemsize

    def quantized_matmul(self, x, head, transpose: bool):
        raise NotImplementedError("quantized output heads are supported on the mlx backend only")

    def half_dtypes(self) -> tuple:
        return (self.t.bfloat16, self.t.float16)

    def exact_half_matmul(self, w) -> bool:
        """Whether half_matmul with `w` accumulates and returns float32 (CUDA's out_dtype)."""
        return w.is_cuda and _out_dtype_ok(self.t, w.device, w.dtype)

    def half_matmul(self, x, w):
        """x @ w.T in float32 from half x (C, K) and w (N, K): float32 accumulation and
        output where the device has it (CUDA), else the half product cast to float32."""
        if w.is_cuda and _out_dtype_ok(self.t, w.device, w.dtype):
            return self.t.mm(x, w.T, out_dtype=self.t.float32)
        return (x @ w.T).to(self.t.float32)

    def nonzero(self, mask):
        """Flat indices (N,) of the True entries of a 1-D mask, in order."""
        return self.t.nonzero(mask.reshape(-1)).reshape(-1)

    def rows(self, x, index):
        """x (N, ...) at rows `index` (M,): a gather that autograd differentiates."""
        return x.index_select(0, index)

    def index_array(self, x, like):
        """Host integers (numpy) as an index array beside `like`."""
        import numpy as np

        return self.t.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(like.device)

    def uniforms(self, u, like):
        """Host or framework uniforms as a float32 array beside `like`."""
        if not self.is_array(u):
            import numpy as np

            u = self.t.from_numpy(np.ascontiguousarray(u, dtype=np.float32))
        return u.to(device=like.device, dtype=self.t.float32)

    def evaluate(self, *xs):
        """Force pending computation (lazy frameworks only); torch computes eagerly."""

    def fused_loss(self, forward, hidden, head):
        """(loss, metrics) of a scalar loss whose forward forms its own gradients
        (hpd.objectives.autograd: torch's autograd.Function)."""
        from hpd.objectives.autograd import torch_fused_loss

        return torch_fused_loss(forward, hidden, head)


_OUT_DTYPE: dict = {}


def _out_dtype_ok(torch, device, dtype) -> bool:
    """torch.mm(..., out_dtype=float32) works for `dtype` on `device` (asked once)."""
    key = (str(device), dtype)
    if key not in _OUT_DTYPE:
        try:
            a = torch.ones((2, 2), dtype=dtype, device=device)
            _OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return _OUT_DTYPE[key]


class MlxOps:
    name = "mlx"

    def __init__(self):
        import mlx.core as mx

        self.mx = mx

    def is_array(self, x) -> bool:
        return isinstance(x, self.mx.array)

    def compute_dtype(self, x):
        # mlx has float64 on the CPU only; keep it when given, else compute in float32.
        return self.mx.float64 if x.dtype == getattr(self.mx, "float64", None) else self.mx.float32

    def astype(self, x, dtype):
        return x.astype(dtype)

    def float_dtype(self, x):
        return x.dtype

    def int_array(self, x):
        return x.astype(self.mx.int32)

    def log_softmax(self, x):
        return x - self.mx.logsumexp(x, axis=-1, keepdims=True)

    def logsumexp(self, x):
        return self.mx.logsumexp(x, axis=-1)

    def exp(self, x):
        return self.mx.exp(x)

    def log(self, x):
        return self.mx.log(x)

    def logaddexp(self, x, y):
        return self.mx.logaddexp(x, y)

    def sigmoid(self, x):
        return self.mx.sigmoid(x)

    def sign(self, x):
        return self.mx.sign(x)

    def abs(self, x):
        return self.mx.abs(x)

    def maximum(self, x, value):
        return self.mx.maximum(x, value)

    def where(self, cond, x, y):
        return self.mx.where(cond, x, y)

    def sum(self, x, axis=None):
        return self.mx.sum(x) if axis is None else self.mx.sum(x, axis=axis)

    def max(self, x):
        return self.mx.max(x)

    def min(self, x):
        return self.mx.min(x)

    def cumsum(self, x):
        return self.mx.cumsum(x, axis=-1)

    def argsort_desc(self, x):
        return self.mx.argsort(-x, axis=-1)

    def sort_desc(self, x):
        return -self.mx.sort(-x, axis=-1)

    def columns(self, x, index):
        return self.mx.take(x, index, axis=-1)

    def take(self, x, idx):
        return self.mx.take_along_axis(x, idx[..., None], axis=-1)[..., 0]

    def take_along(self, x, idx):
        return self.mx.take_along_axis(x, idx, axis=-1)

    def put_along(self, x, idx, values):
        return self.mx.put_along_axis(x, idx, values, axis=-1)

    def top_k(self, x, k: int):
        ids = self.mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
        values = self.mx.take_along_axis(x, ids, axis=-1)
        order = self.mx.argsort(-values, axis=-1)
        return self.mx.take_along_axis(values, order, axis=-1), self.mx.take_along_axis(ids, order, axis=-1)

    def numpy(self, x):
        import numpy as np

        return np.array(x)

    def put(self, shape_like, idx, values):
        # one_hot(idx) * values: (..., V); used only on chunk-sized arrays.
        vocab = shape_like.shape[-1]
        hot = idx[..., None] == self.mx.arange(vocab)
        return self.mx.where(hot, values[..., None], self.mx.zeros_like(shape_like))

    def stop_gradient(self, x):
        return self.mx.stop_gradient(x)

    def zeros_like(self, x):
        return self.mx.zeros_like(x)

    def full_like(self, x, value):
        return self.mx.full(x.shape, value, dtype=x.dtype)

    def argmax(self, x):
        return self.mx.argmax(x, axis=-1)

    def gumbel_like(self, x, generator=None):
        # drawn in float32: mlx's CPU float64 has no random kernels
        noise = self.mx.random.gumbel(shape=x.shape, dtype=self.mx.float32, key=generator)
        return noise.astype(x.dtype)

    def item(self, x) -> float:
        return float(x.item())

    def count(self, mask) -> float:
        return float(self.mx.sum(mask).item())

    def shape(self, x) -> tuple[int, ...]:
        return tuple(x.shape)

    def no_grad(self):
        import contextlib

        return contextlib.nullcontext()

    def zeros(self, shape, dtype, like):
        return self.mx.zeros(tuple(shape), dtype=dtype)

    def concat(self, xs, axis=0):
        return self.mx.concatenate(list(xs), axis=axis)

    def evaluate(self, *xs):
        # mlx is lazy: evaluating per chunk keeps a chunked loop from building one
        # graph whose scheduling could hold every chunk's intermediates at once.
        self.mx.eval(*xs)

    def fused_loss(self, forward, hidden, head):
        """(loss, metrics) of a scalar loss whose forward forms its own gradients
        (hpd.objectives.autograd: mlx's custom_function)."""
        from hpd.objectives.autograd import mlx_fused_loss

        return mlx_fused_loss(forward, hidden, head)

    def tanh(self, x):
        return self.mx.tanh(x)

    def itemsize(self, dtype) -> int:
        return dtype.size

    def quantized_matmul(self, x, head, transpose: bool):
        return self.mx.quantized_matmul(x, head.weight, head.scales, head.biases, transpose=transpose,
                                        group_size=head.group_size, bits=head.bits)

    def nonzero(self, mask):
        import numpy as np

        return self.mx.array(np.flatnonzero(np.array(mask.reshape(-1))).astype(np.int32))

    def rows(self, x, index):
        return x[index]

    def index_array(self, x, like):
        import numpy as np

        return self.mx.array(np.asarray(x, dtype=np.int32))

    def uniforms(self, u, like):
        import numpy as np

        if not self.is_array(u):
            u = self.mx.array(np.asarray(u, dtype=np.float32))
        return u.astype(self.mx.float32)


_OPS: dict[str, Any] = {}


def ops_for(x) -> TorchOps | MlxOps:
    """The shim for the framework that owns array `x`."""
    module = type(x).__module__ or ""
    root = module.split(".")[0]
    if root not in ("torch", "mlx"):
        raise TypeError(
            f"expected a torch tensor or an mlx array, got {type(x).__module__}.{type(x).__name__}"
        )
    if root not in _OPS:
        _OPS[root] = TorchOps() if root == "torch" else MlxOps()
    return _OPS[root]


__all__ = ["ops_for", "TorchOps", "MlxOps", "LOG_FLOOR"]
