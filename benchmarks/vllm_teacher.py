"""The teacher's inference on vLLM against the in-process torch teacher, side by side in one run.

    python -m benchmarks.vllm_teacher [--rounds 3] [--rows 64] [--steps 12] [--out benchmarks/results/vllm-teacher]

1. `hpd generate`: rows/s of `generate_file` (greedy, 64 new tokens) through an in-process
   vLLM engine and through the torch backend, the same prompts, rounds alternating.
2. `hpd cache-teacher`: positions/s of the store's write loop with the vLLM teacher pass and
   with the torch one (top-32, float32 rows), rounds alternating.
3. `hpd distill`: seconds per step with the in-process teacher, and with the same teacher
   served by a vLLM server process on 127.0.0.1 (top-8 and top-32 log-probs), prefetch off (0)
   and on (2); per round one run of each, the median over its steps after the first (which
   nothing was sent ahead for). And "replayed": the server's answers, recorded once and sent
   again by a stand-in process that computes nothing, as a server on hardware of its own
   would be seen (the step pays for the network and its own side of the serialisation).
   Step time is the loop's own (tokens / tokens_per_s: the teacher's part included).

The shipped tiny teacher and student (float32), hpd:tiny/held.jsonl. On a machine whose cores
are shared with the server (here: 2), the served step also pays for the server's forward;
only the ratio of one run's rounds is compared. Writes OUT/results.md and prints it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hpd command does: spinning threads distort timings

import argparse  # noqa: E402
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, commit, read_metrics
from hpd.models.loading import asset_path

TEACHER, STUDENT, DATA = (asset_path(f"hpd:tiny/{n}") for n in ("teacher", "student", "held.jsonl"))


def _rounds(n: int, runs: dict, warm: bool = True) -> dict[str, list[float]]:
    """Each named run once per round, in turn (after one untimed run each: first calls pay for
    allocations and caches); its figures by name."""
    if warm:
        for run in runs.values():
            run()
    out = {name: [] for name in runs}
    for _ in range(n):
        for name, run in runs.items():
            out[name].append(run())
    return out


def generate_part(engine, rounds: int, rows: int, tmp: Path) -> dict[str, list[float]]:
    from hpd.backends import get_backend
    from hpd.engines.vllm_generate import Generator
    from hpd.train.rollout import Sampling, generate_file

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("\n".join(Path(DATA).read_text().splitlines()[:rows]) + "\n")
    torch_be = get_backend("torch")
    tok, model = torch_be.load_tokenizer(TEACHER), torch_be.load_model(TEACHER, trainable=False, dtype="float32")
    sampling = Sampling(max_new_tokens=64)

    def timed(backend, net):
        out = tmp / "responses.jsonl"
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        n = generate_file(backend, net, tok, prompts, out, sampling=sampling, batch_size=rows, greedy=True,
                          progress=False)
        return n / (time.perf_counter() - started)

    return _rounds(rounds, {"torch": lambda: timed(torch_be, model), "vllm": lambda: timed(Generator(engine), None)})


def cache_part(engine, rounds: int, tmp: Path) -> dict[str, list[float]]:
    from hpd.backends import get_backend
    from hpd.teachers.cache import CacheOptions, cache_teacher
    from hpd.teachers.vllm_cache import cache_teacher_vllm

    torch_be = get_backend("torch")
    tok, model = torch_be.load_tokenizer(TEACHER), torch_be.load_model(TEACHER, trainable=False, dtype="float32")
    options = CacheOptions(top_k=32, max_length=64, batch_size=64, logprob_bits=32, examples_per_shard=1024,
                           overwrite=True, progress=False)

    def timed(write):
        out = tmp / "store"
        started = time.perf_counter()
        index = write(out)
        return index["positions"] / (time.perf_counter() - started)

    def on_torch(out):
        return cache_teacher(torch_be, model, tok, DATA, out, options, teacher_name=TEACHER)

    def on_vllm(out):
        return cache_teacher_vllm(engine, tok, DATA, out, options, teacher_name=TEACHER)

    return _rounds(rounds, {"torch": lambda: timed(on_torch), "vllm": lambda: timed(on_vllm)})


def replay(upstream: int, port: int) -> None:
    """A stand-in for a server on other hardware: answers each request the vLLM server on port
    `upstream` answered before (asking it the first time), so that a step pays for the
    network and the serialisation on its own side only. Runs until killed."""
    import hashlib
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers: dict[str, tuple[int, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bytes | None) -> None:
            key = hashlib.sha256(self.command.encode() + self.path.encode() + (body or b"")).hexdigest()
            if key not in answers:
                request = urllib.request.Request(f"http://127.0.0.1:{upstream}{self.path}", data=body,
                                                 headers={"Content-Type": "application/json"}, method=self.command)
                with urllib.request.urlopen(request) as r:
                    answers[key] = (r.status, r.read())
            status, data = answers[key]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's names)
            self._answer(None)

        def do_POST(self):  # noqa: N802
            self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def _wait_for(port: int, timeout: float = 120.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def distill_part(url: str, replayed: str, rounds: int, steps: int, ks: list[int], tmp: Path) -> dict[str, list[float]]:
    import hpd

    def step_s(**teacher) -> float:
        out = tmp / "run"
        shutil.rmtree(out, ignore_errors=True)
        hpd.distill(dict(student=STUDENT, data=DATA, out=str(out), steps=steps, batch_size=16, max_length=64,
                         lr=1e-3, seed=0, progress=False, **teacher))
        times = [r["tokens"] / r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r]
        return statistics.median(times[1:])

    runs = {"in-process": lambda: step_s(teacher=TEACHER)}
    for k in ks:
        for depth in (0, 2):
            runs[f"served, top-{k}, prefetch {depth}"] = (
                lambda k=k, depth=depth: step_s(teacher=url, teacher_top_k=k, teacher_prefetch=depth))
        runs[f"replayed, top-{k}, prefetch 2"] = lambda k=k: step_s(teacher=replayed, teacher_top_k=k)
        step_s(teacher=replayed, teacher_top_k=k)  # the replay learns the server's answers
    return _rounds(rounds, runs, warm=False)  # a run's first step is left out instead


def _ratios(figures: dict[str, list[float]], of: str, to: str) -> str:
    r = [a / b for a, b in zip(figures[of], figures[to])]
    return f"{statistics.median(r):.2f} (rounds {' '.join(f'{x:.2f}' for x in r)})"


def report(gen, cache, dist, args) -> str:
    med = {k: statistics.median(v) for k, v in {**{f"gen {k}": v for k, v in gen.items()},
                                                 **{f"cache {k}": v for k, v in cache.items()},
                                                 **dist}.items()}
    load = os.getloadavg()
    lines = [f"# vLLM teacher vs in-process torch teacher (commit {commit()})", "",
             f"Tiny teacher and student, float32, {args.rounds} rounds alternating; load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min).", "",
             "| what | torch / in-process | vLLM / served | ratio vLLM : torch (median, per round) |",
             "|---|---:|---:|---|",
             f"| `hpd generate`, rows/s ({args.rows} prompts, 64 new tokens, greedy) | {med['gen torch']:.1f} | "
             f"{med['gen vllm']:.1f} | {_ratios(gen, 'vllm', 'torch')} |",
             f"| `hpd cache-teacher`, positions/s (200 rows, top-32) | {med['cache torch']:.0f} | "
             f"{med['cache vllm']:.0f} | {_ratios(cache, 'vllm', 'torch')} |",
             *(f"| `hpd distill`, s/step, {name.removeprefix('served, ')} | {med['in-process']:.4f} | "
               f"{med[name]:.4f} | {_ratios(dist, name, 'in-process')} |" for name in dist if name != "in-process"),
             "", "replayed: the server's answers, recorded once, sent again by a stand-in process that computes "
             "nothing (a server on hardware of its own: the step pays for the network and its own side of the "
             "serialisation only).",
             ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=64, help="prompts generated per round")
    p.add_argument("--steps", type=int, default=12, help="steps per distill run")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32], help="the served teacher's top-k")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm-teacher"))
    p.add_argument("--replay", type=int, nargs=2, help=argparse.SUPPRESS)  # UPSTREAM PORT: the stand-in's process
    args = p.parse_args(argv)
    if args.replay:
        return replay(*args.replay)
    from hpd.engines import vllm as engines
    from tests import vllm_process as server

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine = engines.start(TEACHER, engines.EngineOptions(dtype="float32", max_model_len=128, kv_cache_mb=256,
                                                              max_logprobs=32))
        try:
            gen = generate_part(engine, args.rounds, args.rows, tmp)
            cache = cache_part(engine, args.rounds, tmp)
        finally:
            engine.shutdown()
        port, stand_in = server.free_port(), server.free_port()
        proc = server.start(TEACHER, "tiny-teacher", port, tmp / "server.log", max_logprobs=max(args.ks))
        replaying = subprocess.Popen([sys.executable, "-m", "benchmarks.vllm_teacher", "--replay", str(port),
                                      str(stand_in)], cwd=ROOT)
        try:
            _wait_for(stand_in)
            dist = distill_part(f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{stand_in}/v1", args.rounds,
                                args.steps, args.ks, tmp)
        finally:
            replaying.kill()
            replaying.wait()
            server.stop(proc)
    text = report(gen, cache, dist, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "raw.json").write_text(json.dumps({"generate": gen, "cache": cache, "distill": dist}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
