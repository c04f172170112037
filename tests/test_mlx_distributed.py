"""Several MLX processes on one machine: `mlx.launch --backend ring` with two local ranks.

A 2-rank run must equal a 1-rank run with the same global batch: the ranks take
disjoint halves of each global batch (hpd.data.batches.Batches), divide their loss by the global
token count, and MlxBackend.optimizer_step sums the gradients, so the update is the
1-rank update up to float summation order. Both comparisons use deterministic objectives,
so no per-rank sampling noise enters:
- fkl (chunked loss where the backend chooses it), 1 rank x batch 4 against 2 ranks x batch 2,
  launched as `hpd distill --backend mlx` under mlx.launch;
- hpd + 0.1 sft with schedule `sample: never` (plain loss), 1 rank x batch 4 against 2 ranks x batch 1 x
  grad_accum 2, stopped after 2 steps and resumed to 4 from the 2-rank checkpoint.

Tolerances (float32): loss per step 1e-5 relative (seen ~5e-7), gradient norm 1e-4 relative,
final weights 1e-4 absolute after 4 AdamW steps at lr 1e-2, with every tensor moved by more
than 20 times that (seen: up to 3e-6; they move by ~4e-2); exported logits in transformers against mlx-lm 1e-4.
Rank 0 alone writes metrics.jsonl, checkpoints and the export; both ranks report
rank/world_size from mx.distributed.init().

The children run with OMP_NUM_THREADS=1. If mlx.launch cannot start two ranks talking to
each other here (no launcher, no local TCP), the tests are skipped with its output.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'hpd-distill[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'hpd-distill[mlx]')")

pytestmark = [pytest.mark.mlx, pytest.mark.slow]

LR = 1e-2
STEPS = 4
LAUNCH_TIMEOUT = 300  # seconds; a 2-rank run of the tiny models takes ~20 s on 2 busy cores
IDS = [[1, 5, 9, 30, 70, 2, 100, 44, 17, 3]]


def launcher() -> list[str] | None:
    """mlx.launch next to this interpreter, on PATH, or as a module."""
    here = Path(sys.executable).with_name("mlx.launch")
    if here.exists():
        return [str(here)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    try:
        import mlx._distributed_utils.launch  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def free_port_range(n: int) -> int:
    """A first port p such that p .. p+n-1 are free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range on 127.0.0.1")


def launch(ranks: int, command: list[str], cwd: Path, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch -n RANKS --backend ring -p PORT --env OMP_NUM_THREADS=1 -- COMMAND`: `--`
    keeps the command's own flags (e.g. hpd's --backend) away from mlx.launch's parser."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLX_HOSTFILE", None)
    env.pop("MLX_RANK", None)
    args = [*launcher(), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port_range(ranks)),
            "--env", "OMP_NUM_THREADS=1", "--", *command]
    return subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


HELLO = """
import mlx.core as mx
group = mx.distributed.init()
total = mx.distributed.all_sum(mx.array(float(group.rank() + 1)), group=group).item()
print(f"rank {group.rank()} of {group.size()}: {total}", flush=True)
"""


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """Skip the module, with the reason, if two local ranks cannot start and all_sum."""
    if launcher() is None:
        pytest.skip("mlx.launch is not installed with this mlx")
    folder = tmp_path_factory.mktemp("hello")
    (folder / "hello.py").write_text(HELLO)
    try:
        done = launch(2, [sys.executable, str(folder / "hello.py")], folder, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("mlx.launch -n 2 --backend ring did not finish a 2-rank all_sum in 120 s on this machine")
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    if done.returncode != 0 or lines != ["rank 0 of 2: 3.0", "rank 1 of 2: 3.0"]:
        pytest.skip(f"mlx.launch could not start 2 ring ranks here (exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def base_config(assets, **overrides) -> dict:
    return {"teacher": str(assets["teacher"]), "student": str(assets["student"]), "data": str(assets["data"]),
            "backend": "mlx", "steps": STEPS, "max_length": 48, "lr": LR, "lr_schedule": "constant",
            "seed": 3, "progress": False, **overrides}


def one_rank(assets, out: Path, **overrides):
    import hpd

    result = hpd.distill({**base_config(assets, **overrides), "out": str(out)})
    assert result["backend"].world_size == 1
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, np.ndarray]:
    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    return {k: np.array(v) for f in files for k, v in mx.load(str(f)).items()}


def assert_same_training(single: Path, double: Path, start: Path, steps=range(1, STEPS + 1)):
    a, b = metrics(single), metrics(double)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, STEPS + 1)), \
        "one line per step: only rank 0 writes metrics.jsonl, and a resume trims what it replays"
    for ra, rb in zip(a, b):
        if ra["step"] not in steps:
            continue
        assert rb["tokens"] == ra["tokens"], "the ranks together must see the 1-rank batch"
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]
        assert {k: v for k, v in rb.items() if k.startswith("schedule/")} == \
               {k: v for k, v in ra.items() if k.startswith("schedule/")}
    wa, wb, w0 = weights(single), weights(double), weights(start)
    assert set(wa) == set(wb) == set(w0)
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=0, atol=1e-4, err_msg=name)
        assert np.abs(wa[name] - w0[name]).max() > 20 * 1e-4, f"{name} did not move: the check would be vacuous"


def test_two_ranks_equal_one_rank_cli(assets, tmp_path, ring):
    """`mlx.launch -n 2 ... -- python -m hpd.cli.main distill --backend mlx ...`, fkl."""
    import mlx_lm
    import torch
    from transformers import AutoModelForCausalLM

    from hpd.models.export import check_model_folder

    single = one_rank(assets, tmp_path / "one", method="fkl", batch_size=4)
    assert single["metrics"]["loss"] > 0

    out = tmp_path / "two"
    cfg = base_config(assets, method="fkl", batch_size=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items() if k != "progress"]
    started = time.perf_counter()
    done = launch(2, [sys.executable, "-m", "hpd.cli.main", "distill", *flags, f"--out={out}", "--no-progress"],
                  tmp_path)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # rank 0 alone speaks on stderr; the run saw two processes of 2 rows each
    assert done.stderr.count("distilling ") == 1, done.stderr
    assert f"{STEPS} steps of 4 sequences (2 per batch x 1 accumulated x 2 processes)" in done.stderr
    assert done.stderr.count("exported the student") == 1
    assert seconds < LAUNCH_TIMEOUT

    assert_same_training(tmp_path / "one", out, assets["student"])
    # rank 0 alone wrote the checkpoints and the export: one final checkpoint, no leftovers
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{STEPS}"]
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))
    check_model_folder(out)
    export = json.loads((out / "hpd_export.json").read_text())
    assert export["backend"] == "mlx" and export["steps"] == STEPS

    # the export loads in both ecosystems, with the same logits as the 1-rank student
    want = np.array(single["student"](mx.array(IDS)))
    model, tokenizer = mlx_lm.load(str(out))
    np.testing.assert_allclose(np.array(model(mx.array(IDS))), want, atol=1e-3)
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(hf_logits, np.array(model(mx.array(IDS))), atol=1e-4)
    assert tokenizer.encode("the cat sat") == single["tokenizer"].encode("the cat sat")


DRIVER = """
import json, sys
from pathlib import Path

import hpd
import hpd.train.checkpoint
import hpd.data.examples
import hpd.train.run
from hpd.backends.mlx import MlxBackend

config, report = json.loads(sys.argv[1]), Path(sys.argv[2])
calls = {"metrics": 0, "checkpoint": 0, "save_model": 0, "finalize": 0}
rows = []  # per micro-batch: the token ids of its rows, without padding


def spy(owner, name, key):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


spy(hpd.train.run.MetricsLog, "__call__", "metrics")
spy(hpd.train.checkpoint, "save_checkpoint", "checkpoint")
spy(MlxBackend, "save_model", "save_model")
spy(hpd.train.run, "finalize", "finalize")
next_batch = hpd.data.batches.Batches.__next__


def recording_next(self):
    batch = next_batch(self)
    rows.append([r[: int(m.sum())].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])])
    return batch


hpd.data.batches.Batches.__next__ = recording_next
results = [hpd.distill({**config, "steps": 2}), hpd.distill({**config, "resume": True})]
backend = results[-1]["backend"]
report.with_name(f"{report.name}-{backend.rank}.json").write_text(json.dumps(
    {"rank": backend.rank, "world_size": backend.world_size, "calls": calls, "rows": rows,
     "steps": [r["steps"] for r in results]}))
"""


def test_two_ranks_resume_equals_one_rank(assets, tmp_path, ring):
    """hpd + 0.1 sft (sample: never), 2 ranks x batch 1 x grad_accum 2, 2 steps then --resume to 4,
    against 1 rank x batch 4 in one go; rank/world_size, data shards and who writes what
    are reported by each rank."""
    from hpd.data.batches import Batches, load_dataset
    from hpd.data.examples import pad_id_of

    # hpd alone with s = y has a loss near 0; 0.1 x sft gives the per-step loss a scale to compare
    common = dict(method="hpd", chunked="off",
                  schedule={"sample": "never", "phases": [{"objectives": {"hpd": 1.0, "sft": 0.1}}]})
    single = one_rank(assets, tmp_path / "one", batch_size=4, **common)

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "two"
    config = {**base_config(assets, batch_size=1, grad_accum=2, **common), "out": str(out)}
    done = launch(2, [sys.executable, str(driver), json.dumps(config), str(tmp_path / "report")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]

    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert all(r["steps"] == [2, STEPS] for r in reports)
    first, second = reports[0]["calls"], reports[1]["calls"]
    assert second == {"metrics": 0, "checkpoint": 0, "save_model": 0, "finalize": 0}, \
        "rank 1 must not write metrics, checkpoints or the export"
    # 2 + 2 step lines; two checkpoints (end of each part); export twice; a checkpoint saves the model too
    assert first == {"metrics": STEPS, "checkpoint": 2, "save_model": 4, "finalize": 2}

    # data: per step the ranks' micro-batches are disjoint and together the 1-rank batch
    tok = single["tokenizer"]
    data = load_dataset(assets["data"], tok, 48)
    reference = Batches(data, 4, pad_id_of(tok), seed=3)
    for step in range(STEPS):
        batch = next(reference)
        want = sorted(r[: int(m.sum())].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"]))
        mine = [reports[r]["rows"][2 * step + k] for r in (0, 1) for k in (0, 1)]
        assert all(len(mb) == 1 for mb in mine)
        assert sorted(mb[0] for mb in mine) == want, f"step {step + 1}"

    assert_same_training(tmp_path / "one", out, assets["student"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", f"step-{STEPS}"]
    trainer_state = json.loads((out / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert trainer_state["step"] == STEPS and trainer_state["data"]["index"] == 2 * STEPS
