"""CUDA checks of torch --compile and half-precision chunk logits, one short run.

1. half logits: the chunked loss with a bfloat16 teacher head (152k x 3584, as Qwen2.5-7B's)
   and a float32 student head (1536 wide), 4096 supervised positions: HALF_LOGITS auto
   (float32-output bf16 product, no float32 head copy) against never (the cast), loss and
   gradient differences, time and peak memory of each.
2. compile: tests/test_compile_torch.py's steps on CUDA, compiled against uncompiled
   (loss and gradients), and the graph counts.
3. speed: benchmarks.profile_step, chat and long presets, fkl, --compile off and on.

    python -m benchmarks.cuda_compile_half_logits [--skip-profile]
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks._common import ROOT


def half_logits_check():
    import torch

    import hpd
    import hpd.objectives.heads as heads

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, hs, ht, v = 4096, 1536, 3584, 151936
    sh = torch.randn(1, n, hs, device=dev, generator=g)
    th = torch.randn(1, n, ht, device=dev, generator=g).bfloat16()
    sw = torch.randn(v, hs, device=dev, generator=g) * 0.03
    tw = (torch.randn(v, ht, device=dev, generator=g) * 0.03).bfloat16()
    y = torch.randint(0, v, (1, n), device=dev, generator=g)
    out = {}
    for mode in ("never", "auto", "never", "auto"):
        heads.HALF_LOGITS = mode
        s, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss, _ = hpd.chunked_loss("fkl", s, w, th, tw, y)
        loss.backward()
        torch.cuda.synchronize()
        out[mode] = (time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20,
                     float(loss), s.grad, w.grad)
    heads.HALF_LOGITS = "auto"
    a, b = out["auto"], out["never"]
    print(f"half logits: exact product available: {heads.half_logits(hpd.objectives.ops.ops_for(tw), tw)}")
    print(f"  never: {b[0] * 1000:.1f} ms, peak +{b[1]:.0f} MiB, loss {b[2]:.6f}")
    print(f"  auto:  {a[0] * 1000:.1f} ms, peak +{a[1]:.0f} MiB, loss {a[2]:.6f}")
    print(f"  |loss diff| {abs(a[2] - b[2]):.2e}; grad hidden max diff / max "
          f"{float((a[3] - b[3]).abs().max() / b[3].abs().max()):.2e}; grad head "
          f"{float((a[4] - b[4]).abs().max() / b[4].abs().max()):.2e}")


def compile_check():
    import torch

    from tests import test_compile_torch as t

    t.Cfg.device = "cuda"
    batches = [t.batch(20, 0), t.batch(27, 1), t.batch(40, 2), t.batch(21, 3)]
    for chunked in (True, False):
        t0 = time.perf_counter()
        ref, _ = t.steps("off", chunked, batches)
        t1 = time.perf_counter()
        got, backend = t.steps("on", chunked, batches)
        t2 = time.perf_counter()
        dl = max(abs(a[0] - b[0]) for a, b in zip(ref, got))
        dg = max(float((a[1][k] - b[1][k]).abs().max()) for a, b in zip(ref, got) for k in a[1])
        print(f"compile on CUDA, chunked={chunked}: max |loss diff| {dl:.2e}, max |grad diff| {dg:.2e}; "
              f"eager {t1 - t0:.1f} s, compiled (incl. compiling) {t2 - t1:.1f} s; {backend.compiler.stats()}")
    del torch


def profile():
    runs = [("chat", "off"), ("chat", "on"), ("long", "off"), ("long", "on")]
    for preset, mode in runs:
        cmd = [sys.executable, "-m", "benchmarks.profile_step", "--preset", preset, "--method", "fkl",
               "--device", "cuda", "--repeat", "1", "--iters", "10", "--warmup", "3", "--hpd-args", f"compile={mode}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
        print(f"\n### profile_step {preset} compile={mode} ({time.perf_counter() - t0:.0f} s)\n{proc.stdout}"
              f"{proc.stderr[-1500:] if proc.returncode else ''}", flush=True)


if __name__ == "__main__":
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}", flush=True)
    for step in (half_logits_check, compile_check):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            print(f"{step.__name__} failed: {type(e).__name__}: {e}", flush=True)
    if "--skip-profile" not in sys.argv:
        profile()
