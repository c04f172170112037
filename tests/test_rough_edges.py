"""The rough edges a first user hits, each reproduced and held: file modes, the model card of
a checkpoint export, an unreachable hub, empty output folders, the batch KL beside a
surrogate loss, the distill output, errors that list the choices, help text, the Python
API's recipes, the comparison benchmark, and a recipe squeezed into few steps."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hpd.cli.main import cli

import hpd
from hpd.data.examples import DataError
from hpd.train.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]


def answers(path: Path, n: int = 6) -> Path:
    """Held-out prompt/completion rows with reference answers (exact match needs them)."""
    words = "the cat sat on a mat and the dog ran to it".split()
    path.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 3]), "completion": words[i + 3]}) + "\n"
                            for i in range(n)))
    return path


def config(assets, out: Path, **kw) -> dict:
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=2, batch_size=4, lr=3e-3, progress=False, chunked="off", seed=0,
               save_every=1, keep_checkpoints=1)
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------ 2. file modes follow the umask
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


# ------------------------------------------------------------------ 3. a checkpoint's model card
@pytest.mark.slow
def test_model_card_of_a_checkpoint_export_has_its_metrics(assets, tmp_path):
    out = tmp_path / "run"
    hpd.distill(config(assets, out, steps=3, keep_checkpoints=3))
    target = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "step-2"), "--out", str(target)])
    assert result.exit_code == 0, result.output
    card = (target / "README.md").read_text()
    table = card.split("## Final metrics")[1].split("## Command")[0]
    step2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert step2["step"] == 2
    assert f"| loss | {step2['loss']:.6g} |" in table and f"| kl | {step2['kl']:.6g} |" in table


# ------------------------------------------------------------------ 4. an unreachable hub fails fast
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


# ------------------------------------------------------------------ 5. nothing left behind
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


# ------------------------------------------------------------------ 6. the KL beside a surrogate loss
@pytest.mark.parametrize("method", ["hpd", "sft", "rkl", "jsd", "fkl"])
def test_every_method_reports_the_token_kl(method):
    import torch

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    _, metrics = hpd.loss(method, s, t, y)
    _, reference = hpd.loss("fkl", s, t, y)
    assert metrics["kl"] == pytest.approx(reference["fkl"], rel=1e-5)


def test_chunked_path_reports_the_same_kl():
    import torch

    torch.manual_seed(1)
    hs, ht = torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    ws, wt = torch.randn(13, 8), torch.randn(13, 12)
    y = torch.randint(0, 13, (2, 6))
    sampled = torch.randint(0, 13, (2, 6))
    _, chunked = hpd.chunked_loss("hpd", hs, ws, ht, wt, y, chunk_size=4, sampled=sampled)
    _, plain = hpd.loss("hpd", hs @ ws.T, ht @ wt.T, y, sampled=sampled)
    assert chunked["kl"] == pytest.approx(plain["kl"], rel=1e-5)


# ------------------------------------------------------------------ 7. what distill prints
@pytest.mark.slow
def test_distill_output(assets, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
            str(assets["data"]), "--out", str(out), "--steps", "2", "--batch-size", "2", "--grad-accum", "2",
            "--chunked", "off", "--no-progress"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False).output
    assert "2 steps of 4 sequences (2 per batch x 2 accumulated x 1 process)" in text
    assert len(re.findall("export", text)) == 1, text
    seconds = float(re.search(r"exported the student to \S+ \((\d+\.\d) s\)", text).group(1))
    assert seconds < 30


@pytest.mark.slow
def test_resumed_run_prints_before_and_after_accuracy(assets, tmp_path):
    out = tmp_path / "run"
    common = ["distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]), "--data",
              str(assets["data"]), "--eval-data", str(answers(tmp_path / "held.jsonl")), "--eval-generate", "2",
              "--max-length", "64", "--rollout-max-new-tokens", "4", "--out", str(out), "--batch-size", "4",
              "--chunked", "off", "--no-progress", "--save-every", "1"]
    first = CliRunner().invoke(cli, [*common, "--steps", "1"], catch_exceptions=False)
    assert "held-out exact match: student" in first.output
    resumed = CliRunner().invoke(cli, [*common, "--steps", "2", "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "held-out exact match: student" in resumed.output and "before" in resumed.output


# ------------------------------------------------------------------ 8. errors that list the choices
def test_unknown_recipe_lists_the_shipped_ones():
    result = CliRunner().invoke(cli, ["distill", "--recipe", "tinyy"])
    assert result.exit_code == 2
    import hpd.recipes

    shipped = sorted(p.stem for p in Path(next(iter(hpd.recipes.__path__))).glob("*.yaml"))
    assert {"tiny", "paper-math", "on-policy-mix"} <= set(shipped)
    assert f"shipped recipes: {', '.join(shipped)}" in result.output


def test_method_help_lists_the_methods():
    text = CliRunner().invoke(cli, ["distill", "--help"], terminal_width=200).output
    line = next(ln for ln in text.splitlines() if "--method " in ln)
    assert "hpd.METHODS" not in text and all(m in line for m in hpd.METHODS), line


# ------------------------------------------------------------------ 9, 10. help and messages
def test_top_level_help_cuts_no_description():
    text = CliRunner().invoke(cli, ["--help"]).output
    commands = text.split("Commands:")[1].strip().splitlines()
    assert len(commands) >= 5 and not any(line.rstrip().endswith("...") for line in commands), commands


@pytest.mark.parametrize("command", ["distill", "eval", "export", "generate", "plot"])
def test_every_option_has_help_and_click_type_names(command):
    sub = cli.commands[command]
    for param in sub.params:
        if param.param_type_name == "option" and param.name != "help":
            assert param.help, f"{command} {param.opts} has no help"
    text = CliRunner().invoke(cli, [command, "--help"]).output
    assert not re.search(r" (STR|INT)\b", text), text


def test_eval_has_dtype():
    assert "dtype" in {p.name for p in cli.commands["eval"].params}


def test_errors_use_one_prefix(assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\nnot json\n')
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(assets["teacher"]), "--student",
                                      str(assets["student"]), "--data", str(data), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Error: " in result.output and "error: " not in result.output


def test_generate_help_names_both_row_kinds():
    text = " ".join(CliRunner().invoke(cli, ["generate", "--help"]).output.split())
    assert "{messages} rows" in text and "{prompt, completion} rows" in text


@pytest.mark.slow
def test_eval_limit_limits_every_metric_and_tokens_are_whole(assets, tmp_path):
    from transformers import AutoTokenizer

    from hpd.data.batches import load_dataset

    held = answers(tmp_path / "held.jsonl")
    args = ["eval", "--model", str(assets["student"]), "--teacher", str(assets["teacher"]), "--data",
            str(held), "--limit", "3", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    first3 = load_dataset(held, AutoTokenizer.from_pretrained(assets["tokenizer"]), 1024).examples[:3]
    assert report["rows"] == 3
    assert report["tokens"] == sum(sum(e.loss_mask) for e in first3)
    table = CliRunner().invoke(cli, args, catch_exceptions=False).stdout
    assert re.search(r"^tokens\s+\d+$", table, re.M), table


# ------------------------------------------------------------------ 11. the Python API takes a recipe
def test_python_api_takes_a_recipe():
    cfg = DistillConfig.from_dict({"recipe": "tiny", "steps": 3, "out": "x"})
    assert cfg.steps == 3 and cfg.lr == 2.0e-3 and cfg.out == "x"
    with pytest.raises(FileNotFoundError, match="shipped recipes"):
        DistillConfig.from_dict({"recipe": "tinyy"})


def test_readme_documents_from_recipe_and_hooks():
    readme = (ROOT / "README.md").read_text()
    assert '"recipe": "tiny"' in readme and "DistillConfig.from_recipe" in readme and "hooks" in readme


# ------------------------------------------------------------------ 12. the comparison benchmark
def _compare_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare_methods
    finally:
        sys.path.pop(0)
    return compare_methods


def test_compare_methods_names_and_spread(monkeypatch):
    cm = _compare_module()
    assert set(cm.METHODS) == {"sft", "fkl", "rkl", "jsd", "hpd"}
    assert cm.METHODS["jsd"][0] == "jsd (on-policy)"
    assert cm.spread([0.5]) == "0.500" and cm.spread([0.5, 0.7]).startswith("0.600 ± ")
    seen = {}
    monkeypatch.setattr(sys, "argv", ["compare_methods.py", "--methods", "jsd", "hpd", "--seeds", "0"])
    monkeypatch.setattr(cm, "run_one", lambda *a, **k: seen.setdefault("called", a) and (_ for _ in ()).throw(
        SystemExit(0)))
    monkeypatch.setattr("hpd.backends.get_backend", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit) as e:
        cm.main()  # the arguments parse; stops before loading a model
    assert e.value.code == 0


def test_plot_keeps_lines_apart_and_the_axis_whole(tmp_path):
    pytest.importorskip("matplotlib")
    from hpd.report.plot import plot_runs

    runs = []
    for name, method in (("jsd-seed0", "jsd"), ("hpd-seed0", "hpd")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"method: {method}\n")
        records = [{"step": s, "loss": -0.5, "kl": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "eval/kl": 0.3}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.close
    monkey = lambda fig: captured.setdefault("fig", fig) and real(fig)  # noqa: E731
    plt.close = monkey
    try:
        plot_runs(runs, tmp_path / "c.png")
    finally:
        plt.close = real
    axes = captured["fig"].axes
    titles = [ax.get_title() for ax in axes]
    assert "training loss" not in titles  # two methods: their loss values are not comparable
    for ax in axes:
        styles = [line.get_linestyle() for line in ax.get_lines()]
        assert len(set(styles)) == len(styles)  # coinciding curves stay visible
        assert ax.get_xlim() == (0.0, 4.0)  # one evaluation is a point on the whole run's axis
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["jsd", "hpd"]


# ------------------------------------------------------------------ 13. a recipe squeezed into few steps
def test_compressed_recipe_warns():
    cfg = DistillConfig.from_recipe("tiny", {"steps": 20})
    assert len(cfg.notes) == 1 and "tuned for 600 steps" in cfg.notes[0] and "--lr" in cfg.notes[0]
    assert DistillConfig.from_recipe("tiny", {"steps": 20, "lr": 5e-4}).notes == []
    assert DistillConfig.from_recipe("tiny", {"steps": 300}).notes == []
    assert DistillConfig.from_recipe("tiny").notes == []


def test_hub_probe_goes_through_a_configured_proxy(monkeypatch):
    import hpd.files.hub

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hpd.files.hub._via("https://huggingface.co") == "http://127.0.0.1:9"
    hpd.files.hub._probe.cache_clear()
    assert "cannot connect to 127.0.0.1" in hpd.files.hub._probe("https://huggingface.co", 2.0)
    hpd.files.hub._probe.cache_clear()
