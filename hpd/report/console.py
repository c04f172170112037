"""What a run prints while it trains: a progress bar on a terminal, plain lines elsewhere.

A bar written to a log file becomes one endless line, so without a terminal (or with
`--log-every N`) every N-th step prints one line: step, loss, KL to the teacher, learning
rate, tokens/s and ETA. Evaluation results are printed whenever they arrive, bar or not,
`--no-progress` included. It receives the same records as metrics.jsonl.
"""

from __future__ import annotations

import sys
import time

LINES_PER_RUN = 20  # plain lines of an automatic --log-every


def _number(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return f"{int(v)}"
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Console:
    def __init__(self, total: int, initial: int = 0, *, progress: bool = True, log_every: int = 0,
                 stream=None, watch: str = "kl"):
        self.stream = stream or sys.stderr
        self.total, self.initial, self.watch = total, initial, watch
        bar = progress and not log_every and is_terminal(self.stream) and is_terminal(sys.stdout)
        if log_every:
            self.every = log_every
        elif progress and not bar:
            self.every = max(1, round(total / LINES_PER_RUN))
        else:
            self.every = 0
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="distill", unit="step", dynamic_ncols=True,
                            file=self.stream)
        self.reference: tuple[float, int] | None = None  # (time, step) of the first step seen

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def __call__(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if step == 0:  # the baseline before training: the run prints it itself
            return
        if "loss" in record and "lr" in record:
            self._train(step, record)
        evals = {k[len("eval/"):]: v for k, v in record.items()
                 if k.startswith("eval/") and isinstance(v, (int, float)) and k != "eval/tokens"}
        if evals:
            self._print(f"step {step}/{self.total}  eval: " + "  ".join(f"{k} {_number(v)}" for k, v in evals.items()))

    def _train(self, step: int, r: dict) -> None:
        if self.reference is None:  # the ETA counts from the first step: set-up time is not training
            self.reference = (time.perf_counter(), step)
        kl = r.get(self.watch)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            post = {"loss": f"{r['loss']:.4f}"}
            if kl is not None:
                post["kl"] = f"{kl:.4f}"
            post.update(lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}")
            self.bar.set_postfix(post, refresh=False)
            return
        if not self.every or (step % self.every and step != self.total):
            return
        since, first = self.reference
        done = step - first
        eta = _duration((time.perf_counter() - since) / done * (self.total - step)) if done > 0 else "?"
        parts = [f"step {step}/{self.total}", f"loss {r['loss']:.4f}"]
        if kl is not None:
            parts.append(f"kl {kl:.4f}")
        parts += [f"lr {r['lr']:.2e}", f"tok/s {r['tokens_per_s']:.0f}", f"eta {eta}"]
        self._print("  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
