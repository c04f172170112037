"""A run's files: written files follow the umask, inputs that fail leave no output folder and
an overwrite whose inputs fail keeps the earlier run, and an unreachable model hub fails fast
(or serves what it has cached)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

import hpd
from hpd.data.examples import DataError


def config(assets, out: Path, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=2, batch_size=4, lr=3e-3, progress=False, chunked="off", seed=0,
               save_every=1, keep_checkpoints=1)
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------ file modes follow the umask
@pytest.mark.slow
def test_written_files_follow_the_umask(assets, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        hpd.distill(config(assets, out))
        exported = tmp_path / "exported"
        from hpd.train.export import export_checkpoint

        export_checkpoint(out / "checkpoints" / "step-2", exported)
    finally:
        os.umask(old)
    files = [p for p in [*out.rglob("*"), *exported.rglob("*")] if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "optimizer.safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_umask_077_is_respected_too(tmp_path):
    from hpd.files.filemodes import respect_umask

    (tmp_path / "a.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "a.safetensors", 0o600)
    old = os.umask(0o002)
    try:
        respect_umask(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o664


# ------------------------------------------------------------------ nothing left behind
@pytest.mark.parametrize("bad", ["data", "teacher"])
def test_failed_inputs_leave_no_output_folder(assets, tmp_path, monkeypatch, bad):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    overrides = {"data": str(tmp_path / "missing.jsonl")} if bad == "data" else {"teacher": "nobody-here/no-model"}
    with pytest.raises((FileNotFoundError, ValueError)):
        hpd.distill(config(assets, out, **overrides))
    assert not out.exists()


@pytest.mark.slow
def test_overwrite_keeps_the_previous_run_when_the_inputs_fail(assets, tmp_path):
    out = tmp_path / "run"
    hpd.distill(config(assets, out, steps=1))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(DataError, match="does not exist"):
        hpd.distill(config(assets, out, data=str(tmp_path / "missing.jsonl"), overwrite=True))
    assert (out / "model.safetensors").read_bytes() == before


# ------------------------------------------------------------------ an unreachable hub fails fast
def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    import hpd.files.hub
    from hpd.models.loading import local_or_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"the hub is unreachable \(HF_HUB_OFFLINE is set\) with no cached"):
        local_or_hub("nobody-here/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hpd.files.hub._probe.cache_clear()
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="the hub is unreachable \\(cannot connect to 127.0.0.1"):
        local_or_hub("nobody-here/no-such-model")
    assert time.perf_counter() - started < 5
    hpd.files.hub._probe.cache_clear()


def test_a_cached_model_serves_an_unreachable_hub(monkeypatch, tmp_path):
    import hpd.files.hub
    from hpd.models.loading import local_or_hub

    snapshot = tmp_path / "snap"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hpd.files.hub, "cached_snapshot", lambda repo: snapshot if repo == "org/cached" else None)
    assert local_or_hub("org/cached") == snapshot


def test_hub_probe_goes_through_a_configured_proxy(monkeypatch):
    import hpd.files.hub

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hpd.files.hub._via("https://huggingface.co") == "http://127.0.0.1:9"
    hpd.files.hub._probe.cache_clear()
    assert "cannot connect to 127.0.0.1" in hpd.files.hub._probe("https://huggingface.co", 2.0)
    hpd.files.hub._probe.cache_clear()
