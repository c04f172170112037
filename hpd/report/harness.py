"""EleutherAI's lm-evaluation-harness on a student folder, through its Python API.

An exported student is a transformers folder whichever backend trained it (the export
contract), so the harness runs it with its `hf` model on torch: the same call serves
torch and MLX exports. Tasks are the harness's own names, or tasks defined in local
YAML files found under `include` folders. lm-eval is an optional extra, imported here only.
"""

from __future__ import annotations

from pathlib import Path


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--lm-eval: give one or more task names, comma-separated")
    return tasks


def run_harness(model: str, tasks: list[str], *, include: list[str] = (), batch_size: int = 8,
                limit: int | None = None, device: str = "auto", dtype: str = "auto",
                num_fewshot: int | None = None, seed: int = 0) -> dict:
    """{"lm-eval/<task>/<metric>": value} for every task and metric the harness reports,
    plus "lm-eval/<task>/samples": how many documents were scored."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("--lm-eval needs lm-evaluation-harness: pip install 'hpd-distill[lm-eval]'") from None
    folder = Path(model)
    if folder.exists() and not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json; --lm-eval runs an exported student folder")
    for path in include:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--lm-eval-include {path}: not a folder of task YAML files")
    # only the harness's built-in tasks are indexed when they are asked for: it takes seconds
    manager = TaskManager(include_path=list(include) or None, include_defaults=not include or
                          any(t not in _local_names(include) for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(map(repr, unknown))}"
                         + ("" if include else "; define local tasks in YAML and pass --lm-eval-include DIR"))
    args = {"pretrained": str(model), "dtype": dtype}
    if device != "auto":
        args["device"] = device
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, batch_size=batch_size,
                                  limit=limit or None, num_fewshot=num_fewshot, task_manager=manager,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    flat = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric, _, kind = key.partition(",")
                name = metric if kind in ("", "none") else f"{metric}/{kind}"
                flat[f"lm-eval/{task}/{name}"] = float(value)
        counted = (out.get("n-samples") or {}).get(task, {})
        if "effective" in counted:
            flat[f"lm-eval/{task}/samples"] = counted["effective"]
    return flat


def _local_names(include) -> set[str]:
    """Task names defined in the YAML files under the include folders (a quick scan, no parsing of
    the harness's own tags or includes)."""
    import yaml

    names = set()
    for folder in include:
        for path in Path(folder).rglob("*.yaml"):
            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict):
                for key in ("task", "group", "tag"):
                    value = doc.get(key)
                    if isinstance(value, str):
                        names.add(value)
                    elif isinstance(value, list):
                        names.update(v for v in value if isinstance(v, str))
    return names
