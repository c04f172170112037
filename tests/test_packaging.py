"""The distribution's name and the links that carry it."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from hpd.models.export import DISTRIBUTION, model_card

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_name_is_not_the_taken_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # `hpd` on the public index is an unrelated project (Hierarchical LDA)
    assert project["name"] == DISTRIBUTION != "hpd"
    assert project["scripts"]["hpd"] == "hpd.cli.main:main"


def test_model_card_links_to_our_distribution():
    card = model_card({"backend": "torch", "final_metrics": {}})
    links = re.findall(r"https://pypi\.org/project/([^/)]+)/", card)
    assert links == [DISTRIBUTION]


def test_readme_and_ci_install_the_same_extras():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[torch,mlx,dev]" && python -m pytest -q'
    assert command in readme and command in ci
    # PyTorch's documented CPU-only wheels, not a bare pin that resolves to the CUDA build
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme


def test_optional_extras_are_imported_only_when_used(tmp_path):
    """Reading JSONL, building the console and a `none` reporter list load none of the extras."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    code = (
        "import sys, pathlib\n"
        "import hpd, hpd.data.sources, hpd.report.reporters, hpd.report.harness, hpd.report.console\n"
        f"hpd.data.sources.read_rows({str(data)!r})\n"
        f"assert hpd.report.reporters.open_reporters(['none'], pathlib.Path({str(tmp_path)!r}), {{}}) == []\n"
        "hpd.report.console.Console(10, progress=True)\n"
        "loaded = [m for m in ('datasets', 'pyarrow', 'wandb', 'tensorboard', 'tensorboardX', 'lm_eval', 'torch',"
        " 'mlx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
