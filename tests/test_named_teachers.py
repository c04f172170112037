"""Several named teachers in one run: each row names its teacher, every teacher scores only
its rows, and a mixed batch equals the same rows run teacher by teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from hpd.cli.main import cli

import hpd
from hpd.data.batches import collate, load_dataset
from hpd.data.examples import DataError
from hpd.data.routing import Route, take_rows

NAMES = ("a", "b")


def routed_data(assets, path: Path, n: int | None = None, names=NAMES, kind: str | None = None) -> Path:
    """The assets' rows (those with a `kind` field only, when given), each naming teacher a or b in turn."""
    rows = [json.loads(line) for line in Path(assets["data"]).read_text().splitlines()]
    rows = [r for r in rows if kind is None or kind in r][:n]
    with open(path, "w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({**row, "teacher": names[i % len(names)]}) + "\n")
    return path


def config(assets, out, data, **kw) -> dict:
    cfg = dict(teachers={"a": str(assets["teacher"]), "b": str(assets["qwen_teacher"])}, student=str(assets["student"]),
               data=str(data), out=str(out), steps=3, batch_size=6, lr=3e-3, max_length=64, progress=False, seed=0,
               chunked="on", chunk_size="7")
    cfg.update(kw)
    return cfg


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ routing and refusals
def test_rows_name_their_teacher_in_every_format(assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    rows = [{"prompt": "the cat", "completion": "sat on a mat", "teacher": "b"},
            {"conversations": [{"from": "human", "value": "one two"}, {"from": "gpt", "value": "three"}],
             "teacher": "a"},
            {"instruction": "count", "input": "one", "output": "two three", "teacher": "b"},
            {"messages": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "ran"}],
             "teacher": "a"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(path, tok, 64, route=Route("teacher", NAMES))
    assert [e.route for e in data.examples] == [1, 0, 1, 0]
    batch = collate(data.examples, tok.pad_token_id)
    assert batch["route"].shape == batch["input_ids"].shape
    assert (batch["route"][:, 0] == [1, 0, 1, 0]).all() and (batch["route"] == batch["route"][:, :1]).all()
    sub = take_rows(batch, np.array([1, 3]))
    assert (sub["route"] == 0).all() and sub["input_ids"].shape[0] == 2

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(DataError, match=rf'{missing}:2: no "teacher" field'):
        load_dataset(missing, tok, 64, route=Route("teacher", NAMES))
    assert [e.route for e in load_dataset(missing, tok, 64, route=Route("teacher", NAMES, "a")).examples] == [1, 0]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({**rows[0], "teacher": "c"}) + "\n")
    with pytest.raises(DataError, match=rf"{unknown}:1: \"teacher\": 'c' is not one of the teachers \(a, b\)"):
        load_dataset(unknown, tok, 64, route=Route("teacher", NAMES))
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"prompt": "x", "completion": "y", "domain": "b"}) + "\n")
    assert load_dataset(renamed, tok, 64, route=Route("domain", NAMES)).examples[0].route == 1


def test_the_cli_refuses_bad_rows_and_bad_names_before_anything_is_written(assets, tmp_path):
    data = routed_data(assets, tmp_path / "rows.jsonl")
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({k: v for k, v in json.loads(lines[4]).items() if k != "teacher"})
    data.write_text("\n".join(lines) + "\n")
    base = ["distill", "--teacher", f"a={assets['teacher']}", "--teacher", f"b={assets['qwen_teacher']}",
            "--student", str(assets["student"]), "--data", str(data), "--steps", "1", "--no-progress"]
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, base + ["--out", str(out)])
    assert result.exit_code != 0 and f"{data}:5: no \"teacher\" field" in result.output
    assert not out.exists()
    result = CliRunner().invoke(cli, base + ["--out", str(out), "--default-teacher", "c"])
    assert result.exit_code != 0 and "default_teacher='c' is not a named teacher (named: a, b)" in result.output
    result = CliRunner().invoke(cli, base + ["--out", str(out), "--teacher", str(assets["teacher"])])
    assert result.exit_code != 0 and "name each as NAME=VALUE" in result.output
    result = CliRunner().invoke(cli, base + ["--out", str(out), "--default-teacher", "a", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "teachers: a 32 rows, b 32 rows" in result.output


def test_the_memory_plan_counts_every_teacher(assets, tmp_path):
    args = ["distill", "--teacher", f"a={assets['teacher']}", "--teacher", f"b={assets['qwen_teacher']}",
            "--student", str(assets["student"]), "--data", "x", "--out", str(tmp_path / "o"), "--dry-run",
            "--backend", "torch"]
    plan = CliRunner().invoke(cli, args).output
    assert "teacher a weights" in plan and "teacher b weights" in plan
    offload = CliRunner().invoke(cli, args + ["--teacher-offload"]).output
    assert "teacher a weights" not in offload and "teacher weights (offload: a)" in offload


# ------------------------------------------------------------------ a mixed batch, teacher by teacher
def _models(backend_name, assets):
    from hpd.backends import get_backend

    be = get_backend(backend_name, SimpleNamespace(device="cpu", compile="off", gradient_checkpointing=False))
    be.seed(0)
    student = be.load_model(str(assets["student"]), trainable=True, dtype="float32")
    teachers = {n: be.load_model(str(assets[k]), trainable=False, dtype="float32")
                for n, k in zip(NAMES, ("teacher", "qwen_teacher"))}
    return be, student, teachers


def _grads(be, student) -> dict[str, np.ndarray]:
    if be.name == "torch":
        out = {k: p.grad.detach().numpy().copy() for k, p in student.named_parameters() if p.grad is not None}
        student.zero_grad(set_to_none=True)
        return out
    from mlx.utils import tree_flatten

    grads = be._grads.pop(id(student))
    return {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("method", ["hpd", "jsd"])
def test_a_mixed_batch_equals_its_rows_run_teacher_by_teacher(assets, tmp_path, backend_name, chunked, method):
    if backend_name == "mlx":
        pytest.importorskip("mlx_lm")
    from transformers import AutoTokenizer

    from hpd.teachers.named import NamedTeachers
    from hpd.teachers.run_teacher import RunTeacher
    from hpd.train.loop import objective_loss_fn
    from hpd.train.schedule import Objective

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    data = load_dataset(routed_data(assets, tmp_path / "rows.jsonl"), tok, 64, route=Route("teacher", NAMES))
    order = [0, 1, 3, 2, 5, 7]  # routes a b b a b b
    batch = collate([data.examples[i] for i in order], tok.pad_token_id)
    be, student, models = _models(backend_name, assets)
    vocab = len(tok)
    samples = np.where(batch["targets"] >= 0, (batch["targets"] * 7 + 3) % vocab, 0)
    objectives = [Objective(method, 1.0, {})]
    total = float((batch["targets"] >= 0).sum())
    named = NamedTeachers({n: RunTeacher(str(n)) for n in NAMES}, Route("teacher", NAMES))
    for n in NAMES:
        named.teachers[n].model = models[n]
    loop = SimpleNamespace(backend=be, chunked=chunked, vocab=vocab, teacher=None)

    def step(mb, source):
        arrays = be.to_arrays(mb)
        fn = objective_loss_fn(objectives, source, arrays["targets"], sampled=be.to_arrays({"s": mb["s"]})["s"],
                               num_tokens=total, temperature=1.0, chunk_size=5)
        return be.forward_backward(student, arrays, fn, hidden=chunked)

    mixed = dict(batch, s=samples)
    value, metrics = step(mixed, named.hook()(loop, batch, be.to_arrays(batch), object()))
    got = _grads(be, student)
    ref_value, ref_kl = 0.0, {}
    for k, n in enumerate(NAMES):
        mb = take_rows(mixed, np.flatnonzero(batch["route"][:, 0] == k))
        v, m = step(mb, be.forward(models[n], be.to_arrays(mb), hidden=chunked))
        ref_value += v
        ref_kl[n] = (m["kl"], m["tokens"])
    want = _grads(be, student)
    assert abs(value - ref_value) <= 1e-6 * max(1.0, abs(ref_value))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=key)
    for n in NAMES:  # the per-teacher figures are those of the teacher's own rows
        assert metrics[f"teacher/{n}/tokens"] == ref_kl[n][1]
        np.testing.assert_allclose(metrics[f"teacher/{n}/kl"], ref_kl[n][0], rtol=1e-5)
    assert metrics["teacher/a/rows"] == 2 and metrics["teacher/b/rows"] == 4 and metrics["rows"] == 6


# ------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_a_store_and_a_live_teacher_in_one_run(assets, tmp_path):
    """Teacher a from a lossless store, teacher b live: the run equals both live."""
    data = routed_data(assets, tmp_path / "rows.jsonl")
    store = tmp_path / "store"
    made = CliRunner().invoke(cli, ["cache-teacher", "--teacher", str(assets["teacher"]), "--data", str(data),
                                    "--out", str(store), "--top-k", "320", "--max-length", "64",
                                    "--logprob-bits", "32", "--no-progress"])
    assert made.exit_code == 0, made.output
    live = hpd.distill(config(assets, tmp_path / "live", data))
    mixed = hpd.distill(config(assets, tmp_path / "mixed", data, teachers={"b": str(assets["qwen_teacher"])},
                               teacher_caches={"a": str(store)}))
    for a, b in zip(records(tmp_path / "live"), records(tmp_path / "mixed")):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["teacher/a/kl"], b["teacher/a/kl"], rtol=1e-5)
    wa = live["student"].state_dict()
    wb = mixed["student"].state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


@pytest.mark.slow
def test_torch_and_mlx_agree_on_a_routed_run(assets, tmp_path):
    pytest.importorskip("mlx_lm")
    data = routed_data(assets, tmp_path / "rows.jsonl")
    held = routed_data(assets, tmp_path / "held.jsonl", n=12)
    for backend in ("torch", "mlx"):
        hpd.distill(config(assets, tmp_path / backend, data, backend=backend, method="fkl", eval_data=str(held)))
    torch_records, mlx_records = records(tmp_path / "torch"), records(tmp_path / "mlx")
    for a, b in zip(torch_records, mlx_records):
        key = "loss" if "loss" in a else "eval/kl"
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
        for n in NAMES:  # per teacher, in training and in the held-out evaluation
            key = f"teacher/{n}/kl" if "loss" in a else f"eval/teacher/{n}/kl"
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
    assert "eval/teacher/a/kl" in torch_records[-1]


@pytest.mark.slow
def test_offload_changes_the_memory_not_the_run(assets, tmp_path, capsys):
    data = routed_data(assets, tmp_path / "rows.jsonl")
    kept = hpd.distill(config(assets, tmp_path / "kept", data))
    offloaded = hpd.distill(config(assets, tmp_path / "off", data, teacher_offload=True))
    assert "teacher offload: only the teachers a batch needs stay loaded" in capsys.readouterr().err
    for a, b in zip(records(tmp_path / "kept"), records(tmp_path / "off")):
        assert a["loss"] == b["loss"] and "teacher/load_s" in b and "teacher/load_s" not in a
    assert kept["metrics"]["loss"] == offloaded["metrics"]["loss"]


@pytest.mark.slow
def test_rollouts_packing_and_resume_keep_each_rows_teacher(assets, tmp_path):
    """On-policy steps score each rollout by its row's teacher, packed or not, and a resumed
    run equals an uninterrupted one: the routing is a function of the rows alone."""
    data = routed_data(assets, tmp_path / "rows.jsonl")
    on_policy = dict(method="fkl", rollout_max_new_tokens=6, schedule={"lambda_start": 0.5}, steps=4,
                     save_every=2)
    runs = {}
    for packing in (False, True):
        runs[packing] = hpd.distill(config(assets, tmp_path / f"p{int(packing)}", data, packing=packing, **on_policy))
    a, b = records(tmp_path / "p0"), records(tmp_path / "p1")
    assert any(r.get("rollout/tokens", 0) > 0 for r in a)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
        assert x["teacher/a/rows"] == y["teacher/a/rows"]
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "p0" / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    resumed = hpd.distill(config(assets, part, data, resume=True, **on_policy))
    wa, wb = runs[False]["student"].state_dict(), resumed["student"].state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0


@pytest.mark.slow
def test_eval_reports_kl_per_teacher_on_its_rows(assets, tmp_path):
    data = routed_data(assets, tmp_path / "rows.jsonl", n=16, kind="prompt")  # exact match needs prompts
    only_a = tmp_path / "a.jsonl"
    only_a.write_text("".join(line + "\n" for line in data.read_text().splitlines()[::2]))
    both = CliRunner().invoke(cli, ["eval", "--model", str(assets["student"]), "--teacher", f"a={assets['teacher']}",
                                    "--teacher", f"b={assets['qwen_teacher']}", "--data", str(data), "--json",
                                    "--no-progress", "--max-new-tokens", "4"])
    assert both.exit_code == 0, both.output
    alone = CliRunner().invoke(cli, ["eval", "--model", str(assets["student"]), "--teacher", str(assets["teacher"]),
                                     "--data", str(only_a), "--json", "--no-progress", "--max-new-tokens", "4"])
    assert alone.exit_code == 0, alone.output
    got, want = json.loads(both.output.splitlines()[-1]), json.loads(alone.output.splitlines()[-1])
    np.testing.assert_allclose(got["kl_to_teacher/a"], want["kl_to_teacher"], rtol=1e-6)
    assert got["tokens/a"] == want["tokens"] and got["tokens/a"] + got["tokens/b"] == got["tokens"]
