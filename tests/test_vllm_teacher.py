"""The teacher's inference on an in-process vLLM engine: `hpd generate --backend vllm` and
`hpd cache-teacher --backend vllm`, against `--backend torch` on the shipped tiny teacher
(float32).

- generate: greedy files identical, row for row, and resumed as torch's are;
- cache-teacher: top-k ids equal except at exact ties, top-k and data-token log-probs
  within 1e-4, the provenance naming the engine; `hpd distill --teacher-cache` from either
  store gives a first-step loss within 1e-4 relative (fkl, rkl), 3e-4 for hpd (its
  sampled-token term reads the rest mass, which vLLM's kernels and transformers' put a few
  1e-7 apart where it is ~1e-6: the smallest rests differ by up to ~15%);
- a store interrupted after a shard and resumed equals one written at once.

The commands run with the session's one engine (`vllm_teacher`), lent through the CLI's
`start_vllm`, which records what each command asked of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import hpd  # noqa: E402
from hpd.cli.main import cli  # noqa: E402
from hpd.models.loading import asset_path  # noqa: E402
from hpd.teachers.store import Store, StoreError  # noqa: E402

TEACHER = asset_path("hpd:tiny/teacher")


class Lent:
    """The session's engine lent to one command: its shutdown leaves the engine running."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def lent_engine(vllm_teacher, monkeypatch):
    """The CLI's `start_vllm` answering with the session's engine; the calls it got."""
    calls = []

    def start(model, **settings):
        calls.append({"model": model, **settings})
        assert model == TEACHER
        return Lent(vllm_teacher)

    monkeypatch.setattr("hpd.cli.options.start_vllm", start)
    return calls


def _prompts(tmp_path: Path, n: int = 24) -> Path:
    rows = Path(asset_path("hpd:tiny/held.jsonl")).read_text().splitlines()[:n]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _generate(backend: str, data: Path, out: Path, *extra: str):
    args = ["generate", "--backend", backend, "--model", TEACHER, "--data", str(data), "--out", str(out),
            "--greedy", "--max-new-tokens", "24", "--dtype", "float32", "--batch-size", "8", "--no-progress", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


def test_generate_greedy_equals_torch_and_resumes(lent_engine, tmp_path):
    data = _prompts(tmp_path)
    _generate("torch", data, tmp_path / "torch.jsonl")
    _generate("vllm", data, tmp_path / "vllm.jsonl", "--tensor-parallel-size", "1", "--vllm-arg", "max_num_seqs=8")
    assert lent_engine[-1]["tensor_parallel_size"] == 1 and lent_engine[-1]["vllm_args"] == ("max_num_seqs=8",)
    want = (tmp_path / "torch.jsonl").read_text()
    assert (tmp_path / "vllm.jsonl").read_text() == want and len(want.splitlines()) == 24
    lines = want.splitlines()  # interrupted: six rows lost and a torn last line
    (tmp_path / "vllm.jsonl").write_text("\n".join(lines[:17]) + "\n" + lines[17][:9])
    again = _generate("vllm", data, tmp_path / "vllm.jsonl")
    assert "wrote 7 rows" in again.output and (tmp_path / "vllm.jsonl").read_text() == want


def test_vllm_flags_need_the_vllm_backend(tmp_path):
    args = ["generate", "--model", TEACHER, "--data", str(_prompts(tmp_path)), "--out", str(tmp_path / "o.jsonl"),
            "--tensor-parallel-size", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "need --backend vllm" in result.output
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- cache-teacher

DATA = asset_path("hpd:tiny/held.jsonl")
K = 32


def _cache(backend: str, out: Path, *extra: str):
    args = ["cache-teacher", "--backend", backend, "--teacher", TEACHER, "--data", DATA, "--out", str(out),
            "--top-k", str(K), "--max-length", "64", "--logprob-bits", "32", "--batch-size", "32",
            "--examples-per-shard", "64", "--dtype", "float32", "--no-progress", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-stores")
    return {"torch": _cache("torch", root / "torch")}


def test_cache_teacher_equals_torch(lent_engine, stores, tmp_path):
    _cache("vllm", tmp_path / "vllm")
    assert lent_engine[-1]["max_logprobs"] == K and lent_engine[-1]["max_model_len"] <= 64 + 1
    a, b = Store(tmp_path / "vllm"), Store(stores["torch"])
    prov = a.provenance
    assert prov["engine"] == "vllm" and prov["engine_version"] == __import__("vllm").__version__
    assert prov["backend"] == "vllm" and prov["tokens_sha256"] == b.provenance["tokens_sha256"]
    assert a.index["positions"] == b.index["positions"] > 4000
    differ = 0
    for i in range(a.index["examples"]):
        x, y = a.example(i), b.example(i)
        assert np.abs(x["logprobs"] - y["logprobs"]).max() < 1e-4
        assert np.abs(x["data_logprob"] - y["data_logprob"]).max() < 1e-4
        bad = x["ids"] != y["ids"]
        differ += int(bad.sum())
        for p, r in np.argwhere(bad):  # only where two of the teacher's log-probs tie (to float32)
            twin = np.flatnonzero(y["ids"][p] == x["ids"][p, r])
            assert len(twin) == 1 and abs(y["logprobs"][p, twin[0]] - y["logprobs"][p, r]) < 1e-6
    assert differ < 1e-4 * a.index["positions"] * K


@pytest.fixture(scope="module")
def vllm_store(vllm_teacher, tmp_path_factory):
    from transformers import AutoTokenizer

    from hpd.teachers.cache import CacheOptions
    from hpd.teachers.vllm_cache import cache_teacher_vllm

    out = tmp_path_factory.mktemp("vllm-store") / "store"
    options = CacheOptions(top_k=K, max_length=64, batch_size=32, logprob_bits=32, examples_per_shard=64,
                           progress=False)
    cache_teacher_vllm(vllm_teacher, AutoTokenizer.from_pretrained(TEACHER), DATA, out, options, teacher_name=TEACHER)
    return out


@pytest.mark.parametrize("method, rtol", [("fkl", 1e-4), ("rkl", 1e-4), ("hpd", 3e-4)])
def test_first_step_loss_from_either_store(stores, vllm_store, tmp_path, method, rtol):
    def first_loss(store: Path, out: Path) -> float:
        result = hpd.distill(dict(teacher_cache=str(store), student=asset_path("hpd:tiny/student"), data=DATA,
                                  out=str(out), steps=1, batch_size=16, max_length=64, progress=False, seed=0,
                                  lr=1e-3, method=method))
        return result["metrics"]["loss"]

    torch_loss, vllm_loss = first_loss(stores["torch"], tmp_path / "t"), first_loss(vllm_store, tmp_path / "v")
    assert vllm_loss == pytest.approx(torch_loss, rel=rtol)


class Killed(RuntimeError):
    pass


def test_resume_after_a_kill_writes_the_same_store(vllm_teacher, vllm_store, tmp_path):
    from transformers import AutoTokenizer

    from hpd.teachers.cache import CacheOptions
    from hpd.teachers.vllm_cache import cache_teacher_vllm

    tok = AutoTokenizer.from_pretrained(TEACHER)
    options = dict(top_k=K, max_length=64, batch_size=32, logprob_bits=32, examples_per_shard=64, progress=False)

    def kill_after_two(index):
        if len(index["shards"]) == 2:
            raise Killed

    out = tmp_path / "part"
    with pytest.raises(Killed):
        cache_teacher_vllm(vllm_teacher, tok, DATA, out, CacheOptions(**options), teacher_name=TEACHER,
                           after_shard=kill_after_two)
    with pytest.raises(StoreError, match="covers 128 of 200 examples"):
        Store(out)
    index = cache_teacher_vllm(vllm_teacher, tok, DATA, out, CacheOptions(**options, resume=True),
                               teacher_name=TEACHER)
    assert index["complete"]
    whole = json.loads((vllm_store / "index.json").read_text())
    assert [s["examples"] for s in index["shards"]] == [s["examples"] for s in whole["shards"]]
    for s in whole["shards"]:
        assert (out / s["file"]).read_bytes() == (vllm_store / s["file"]).read_bytes()


def test_refusals_in_one_line(lent_engine, assets, tmp_path):
    base = ["cache-teacher", "--backend", "vllm", "--teacher", TEACHER, "--data", DATA, "--max-length", "64",
            "--no-progress"]
    cases = [(["--temperature", "2"], "temperature 1 only"),
             (["--student", str(assets["student"])], "teacher's own tokenizer"),
             (["--top-k", "1000"], "larger than the teacher's vocabulary")]
    for i, (extra, words) in enumerate(cases):
        out = tmp_path / f"o{i}"
        result = CliRunner().invoke(cli, [*base, "--out", str(out), *extra])
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "q"), "--teacher-quantize", "4"])
    assert result.exit_code == 2 and "--vllm-arg quantization" in result.output
    assert not lent_engine  # refused before any engine was asked for
