"""Config, recipes, and the CLI's flags, help and error messages (fast)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from hpd.cli.main import cli

import hpd
from hpd.train.config import DistillConfig, resolve_recipe
from hpd.train.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"tiny", "paper-math", "paper-code", "paper-dialogue"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    cfg = DistillConfig.from_recipe(path)
    cfg.validate(require_paths=False)
    Schedule(cfg.schedule_config(), method=cfg.method, method_params=dict(cfg.method_params),
             total_steps=1000, seed=cfg.seed)


def test_shipped_recipe_by_name():
    assert resolve_recipe("tiny").name == "tiny.yaml"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_recipe("no-such-recipe")


def test_unknown_key_lists_known_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"teacher": "a", "learning_rate": 1e-5}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\): learning_rate; known keys: .*\blr\b"):
        DistillConfig.from_recipe(path)


def test_validation_reports_every_error_at_once():
    cfg = DistillConfig.from_dict({"lr": -1, "batch_size": 0, "lr_schedule": "step", "method": "kl"})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    text = str(err.value)
    for needle in ("lr=-1.0", "batch_size=0", "lr_schedule='step'", "unknown method 'kl'", "teacher is required"):
        assert needle in text, text


def test_yaml_numbers_are_coerced():
    cfg = DistillConfig.from_dict({"lr": "5e-6", "steps": 10.0, "epochs": 2})
    assert cfg.lr == 5e-6 and cfg.steps == 10 and isinstance(cfg.epochs, float)
    with pytest.raises(ValueError, match="steps: expected int"):
        DistillConfig.from_dict({"steps": 2.5})


def test_only_flags_the_user_set_override_the_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": "t", "student": "s", "data": "d.jsonl", "out": "o",
                                      "lr": 5e-6, "batch_size": 2, "method": "jsd",
                                      "method_params": {"beta": 0.3}}))
    seen = {}

    def fake_run(cfg, command=None):
        seen["cfg"] = cfg
        return {"steps": 0, "metrics": {}, "out": cfg.out, "backend": SimpleNamespace(rank=0)}

    monkeypatch.setattr("hpd.train.run.distill", fake_run)
    from hpd.cli.main import cli

    result = CliRunner().invoke(cli, ["distill", "--recipe", str(recipe), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.batch_size == 4 and cfg.lr == 5e-6 and cfg.method == "jsd"
    assert cfg.method_params == {"beta": 0.3} and cfg.seed == 0


def test_cli_param_sets_method_parameters(monkeypatch):
    seen = {}
    monkeypatch.setattr("hpd.train.run.distill", lambda cfg, command=None: seen.setdefault("cfg", cfg) and
                        {"steps": 0, "metrics": {}, "out": cfg.out, "backend": SimpleNamespace(rank=0)})
    from hpd.cli.main import cli

    args = ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--method", "jsd",
            "--param", "beta=0.9"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert seen["cfg"].method_params == {"beta": 0.9}
    bad = CliRunner().invoke(cli, args[:-1] + ["gamma=1"])
    assert bad.exit_code != 0 and "unknown parameter" in bad.output


def test_help_explains_every_option():
    from hpd.cli.main import cli

    text = CliRunner().invoke(cli, ["distill", "--help"]).output
    # fields set through another flag: named teachers and stores by --teacher / --teacher-cache NAME=...
    through = {"teachers": "--teacher [NAME=]VALUE", "teacher_caches": "--teacher-cache [NAME=]VALUE",
               "method_params": "--param"}
    for f in DistillConfig.field_names():
        if f == "schedule":  # a recipe's mapping
            continue
        assert through.get(f, "--" + f.replace("_", "-")) in text, f
    assert "[default:" in text


def test_import_hpd_is_light():
    import subprocess
    import sys

    code = "import hpd, hpd.train.config, hpd.train.schedule, hpd.data.examples, hpd.train.loop, sys; " \
           "print(any(m.split('.')[0] in ('torch', 'mlx') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_api_takes_a_recipe():
    cfg = DistillConfig.from_dict({"recipe": "tiny", "steps": 3, "out": "x"})
    assert cfg.steps == 3 and cfg.lr == 2.0e-3 and cfg.out == "x"
    with pytest.raises(FileNotFoundError, match="shipped recipes"):
        DistillConfig.from_dict({"recipe": "tinyy"})


def test_readme_documents_from_recipe_and_hooks():
    readme = (ROOT / "README.md").read_text()
    assert '"recipe": "tiny"' in readme and "DistillConfig.from_recipe" in readme and "hooks" in readme


def test_compressed_recipe_warns():
    cfg = DistillConfig.from_recipe("tiny", {"steps": 20})
    assert len(cfg.notes) == 1 and "tuned for 600 steps" in cfg.notes[0] and "--lr" in cfg.notes[0]
    assert DistillConfig.from_recipe("tiny", {"steps": 20, "lr": 5e-4}).notes == []
    assert DistillConfig.from_recipe("tiny", {"steps": 300}).notes == []
    assert DistillConfig.from_recipe("tiny").notes == []


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


def test_generate_help_names_both_row_kinds():
    text = " ".join(CliRunner().invoke(cli, ["generate", "--help"]).output.split())
    assert "{messages} rows" in text and "{prompt, completion} rows" in text


def test_errors_use_one_prefix(assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the cat"}\nnot json\n')
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(assets["teacher"]), "--student",
                                      str(assets["student"]), "--data", str(data), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Error: " in result.output and "error: " not in result.output


@pytest.mark.parametrize("fields,needle", [
    ({"backend": "mlx", "rollout_engine": "vllm"}, "rollout_engine=vllm runs with backend=torch"),
    ({"rollout_kv_cache_mb": 64}, "rollout_kv_cache_mb: set only with rollout_engine=vllm"),
    ({"rollout_engine": "vllm", "rollout_vllm_args": ["max_num_seqs"]}, "--rollout-vllm-args 'max_num_seqs'"),
])
def test_rollout_engine_misuse_is_refused_in_one_line(fields, needle):
    cfg = DistillConfig.from_dict({"teacher": "t", "student": "s", "data": "d", "out": "o", **fields})
    with pytest.raises(ValueError) as err:
        cfg.validate(require_paths=False)
    assert str(err.value).startswith("invalid config: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_the_rollout_engine_starts_only_where_a_step_can_be_on_policy():
    from hpd.train.rollout_vllm import wanted

    def cfg(**kw):
        return DistillConfig.from_dict({"rollout_engine": "vllm", **kw})

    assert not wanted(cfg()) and not wanted(cfg(schedule={"lambda_start": 0.0}))
    assert wanted(cfg(schedule={"lambda_start": 0.2}))
    assert wanted(cfg(schedule={"lambda_schedule": "linear", "lambda_start": 0.0, "lambda_end": 0.5}))
    assert not wanted(DistillConfig.from_dict({"schedule": {"lambda_start": 1.0}}))  # hf: no engine
