"""`torchrun --nproc-per-node 2 hpd distill --backend torch` on CPU (gloo), against one process.

Two ranks with micro-batches of 2 see the same rows per step as one process with batches
of 4 (`hpd.data.batches.Batches` deals batch i of the one-process order to the ranks as its
halves), so losses, gradient norms and weights must agree up to float reordering:

- loss and gradient norm per step: relative 1e-5 (seen: ~1e-7);
- final weights: absolute 1e-5 (seen: 1.6e-7 for FSDP2, 2.3e-6 for DDP with accumulation;
  AdamW's first steps move each weight by about lr = 3e-3 whatever the gradient's size, so
  reordering noise in near-zero gradients shows up in the weights first).

The gradient norm is the sharp check: AdamW and clipping are blind to a uniform scale of
the gradients, so summing versus averaging over ranks shows only there.

The hpd parity test here uses `schedule: {sample: never}` (s = y), which isolates the
data-parallel arithmetic. With sampling on, the per-position samples are drawn from
uniforms keyed by (seed, step, global row, position), the same whatever the split:
tests/test_split_invariance.py holds 2 ranks to one process with sampling on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import hpd
from hpd.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def common(assets, out: Path, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), backend="torch", steps=4, lr=3e-3, warmup_ratio=0.0, max_grad_norm=0.3,
               progress=False, chunked="off", seed=0)
    cfg.update(kw)
    return cfg


def torchrun(cfg: dict, nproc: int = 2, recipe: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N $(which hpd) distill ...` with cfg as flags."""
    hpd_script = Path(sys.executable).parent / "hpd"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [str(hpd_script)] if hpd_script.exists() else ["-m", "hpd.cli.main"]
    cmd.append("distill")
    if recipe is not None:
        cmd += ["--recipe", str(recipe)]
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a two-core machine
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr[-6000:]}"
    return result


def steps_of(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r and "skipped" not in r]


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_run(one: Path, two: Path, *, weight_atol: float = WEIGHT_ATOL) -> None:
    a, b = steps_of(one), steps_of(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(y["grad_norm"], x["grad_norm"], rtol=LOSS_RTOL)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    diff = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert diff < weight_atol, diff


@pytest.fixture(scope="module")
def fsdp_fkl(assets, tmp_path_factory):
    """fkl: 2 ranks x 2 rows under FSDP2 (checkpoint at step 2) and 1 process x 4 rows."""
    root = tmp_path_factory.mktemp("fsdp_fkl")
    torchrun(common(assets, root / "two", method="fkl", batch_size=2, save_every=2, parallel="fsdp"))
    hpd.distill(common(assets, root / "one", method="fkl", batch_size=4))
    return root


def test_fsdp_matches_one_process(fsdp_fkl):
    assert_same_run(fsdp_fkl / "one", fsdp_fkl / "two")
    # clipping was active, so the reported norm is the global one over all shards
    assert all(r["grad_norm"] > 0.3 for r in steps_of(fsdp_fkl / "two"))


def test_ddp_accumulation_chunked_matches_one_process(assets, tmp_path):
    """DDP, 2 ranks x 2 micro-batches of 1 (no_sync on the first), chunked loss."""
    torchrun(common(assets, tmp_path / "two", method="fkl", batch_size=1, grad_accum=2, parallel="ddp",
                    chunked="on"))
    hpd.distill(common(assets, tmp_path / "one", method="fkl", batch_size=4, chunked="on"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_hpd_tied_sharded_teacher_matches_one_process(assets, tmp_path):
    """hpd with s = y, Qwen2 with tied embeddings, FSDP2 student and sharded teacher, chunked."""
    recipe = tmp_path / "never.yaml"
    recipe.write_text("method: hpd\nschedule:\n  sample: never\n")
    pair = dict(teacher=str(assets["qwen_teacher"]), student=str(assets["qwen_student"]), chunked="on")
    torchrun(common(assets, tmp_path / "two", batch_size=2, teacher_placement="shard", **pair), recipe=recipe)
    one = common(assets, tmp_path / "one", batch_size=4, method="hpd", schedule={"sample": "never"}, **pair)
    hpd.distill(one)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in weights(tmp_path / "two")


def test_named_sharded_teachers_match_one_process(assets, tmp_path):
    """Two named teachers sharded across 2 ranks: every rank runs each teacher's forward, also
    one whose rows all went to the other rank, and the run equals one process's."""
    rows = [json.loads(line) for line in Path(assets["data"]).read_text().splitlines()]
    data = tmp_path / "routed.jsonl"
    data.write_text("".join(json.dumps({**r, "teacher": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows)))
    teachers = {"a": str(assets["teacher"]), "b": str(assets["qwen_teacher"])}
    recipe = tmp_path / "teachers.yaml"
    recipe.write_text(json.dumps({"teachers": teachers}))  # YAML reads JSON
    two = common(assets, tmp_path / "two", data=str(data), method="fkl", batch_size=2, teacher_placement="shard",
                 chunked="on")
    two.pop("teacher")
    torchrun(two, recipe=recipe)
    one = common(assets, tmp_path / "one", data=str(data), method="fkl", batch_size=4, chunked="on",
                 teachers=teachers)
    one.pop("teacher")
    hpd.distill(one)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert any(r.get("teacher/a/rows") and r.get("teacher/b/rows") for r in steps_of(tmp_path / "two"))


def test_a_rows_mix_where_one_rank_replaces_no_row_does_not_stall(assets, tmp_path):
    """rollout_mix rows with one row per rank: at a share of 0.5 about half the steps ask one
    rank for a rollout and not the other, whose FSDP shards the generating rank's forwards still
    gather (transformers' generate runs synced across ranks); that rank takes part with one row
    it drops, and the run finishes."""
    from hpd.train.schedule import Schedule
    from hpd.train.schedule_config import ScheduleConfig

    schedule = {"rollout_mix": "rows", "lambda_start": 0.5}
    coins = Schedule(ScheduleConfig.from_dict(schedule), method="hpd", method_params={}, total_steps=8, seed=0)
    # two rows of a step drawn one in, one out: the case, for a good share of (step, pair)
    assert sum(sum(coins.rollout_rows(t, [r, r + 1])) == 1 for t in range(8) for r in range(0, 16, 2)) > 16
    recipe = tmp_path / "rows.yaml"
    recipe.write_text("schedule:\n" + "".join(f"  {k}: {v}\n" for k, v in schedule.items()))
    out = tmp_path / "two"
    torchrun(common(assets, out, method="hpd", steps=8, batch_size=2, parallel="fsdp", rollout_max_new_tokens=6),
             recipe=recipe, timeout=240)
    steps = steps_of(out)
    assert len(steps) == 8 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["schedule/rollout_share"] == 0.5 for r in steps)


def test_resume_of_two_ranks_equals_uninterrupted(assets, tmp_path):
    """hpd with per-position samples: 2 steps + resume + 2 steps == 4 steps, bit for bit."""
    cfg = common(assets, tmp_path / "full", method="hpd", batch_size=2, save_every=2)
    torchrun(cfg)
    step2 = tmp_path / "full" / "checkpoints" / "step-2"
    rng0 = load_file(str(step2 / ckpt.DIST_DIR / "rng-0.safetensors"))
    rng1 = load_file(str(step2 / ckpt.DIST_DIR / "rng-1.safetensors"))
    assert not np.array_equal(rng0["torch"], rng1["torch"])  # seeded with seed + rank
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, part / "checkpoints" / "step-2")
    torchrun({**cfg, "out": str(part), "resume": True})
    full, resumed = steps_of(tmp_path / "full"), steps_of(part)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    wa, wb = weights(tmp_path / "full"), weights(part)
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) == 0.0


def test_distributed_checkpoint_is_a_model_folder(fsdp_fkl, tmp_path):
    from click.testing import CliRunner
    from hpd.cli.main import cli

    step2 = fsdp_fkl / "two" / "checkpoints" / "step-2"
    assert json.loads((step2 / ckpt.STATE_FILE).read_text())["world_size"] == 2
    target = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(step2), "--out", str(target)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names and ckpt.DIST_DIR not in names


def test_resume_needs_the_same_number_of_processes(fsdp_fkl, tmp_path, assets):
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp_fkl / "two" / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    with pytest.raises(ValueError, match="several processes"):  # one process, no torchrun
        hpd.distill(common(assets, part, method="fkl", batch_size=4, resume=True))

    class ThreeRanks:
        collective_checkpoint, rank, world_size = True, 0, 3

    with pytest.raises(ValueError, match="written by 2 processes, this run has 3"):
        ckpt.load_state(part / "checkpoints" / "step-2", ThreeRanks(), None, None)


def test_export_after_distributed_run_loads_in_transformers_and_mlx(fsdp_fkl, assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fsdp_fkl / "two"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == 10000.0
    assert (out / "README.md").exists() and (out / "generation_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 88]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits.numpy()
        one = AutoModelForCausalLM.from_pretrained(fsdp_fkl / "one").eval()(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, one, atol=1e-4, rtol=0)  # the one-process run's student

    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tok = mlx_lm.load(str(out))
    assert tok.encode("the cat sat") == AutoTokenizer.from_pretrained(out).encode("the cat sat")
    mlx_logits = np.array(model(mx.array(ids.numpy())).astype(mx.float32))
    np.testing.assert_allclose(mlx_logits, got, atol=1e-4, rtol=0)
