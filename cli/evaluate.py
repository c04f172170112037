"""`hpd eval`: accuracy, perplexity and KL to the teacher on held-out data; lm-eval tasks.

`--metric` chooses how generations are scored: exact match of an extracted answer (math:
`--extractor math`; sampled with `--samples K`, that is pass@1), ROUGE-L for dialogue, or
pass@1 of code run against each row's tests in a sandbox. `--recipe` takes the metric, the
extractor, the held-out data and the sampling temperature from a training recipe, so a
student is scored the way its recipe says (`recipes/paper-*.yaml`)."""

from __future__ import annotations

import json

import click

from hpd.cli import options


@click.command(name="eval", context_settings={"max_content_width": 100},
               short_help="Accuracy, perplexity and KL to a teacher; lm-eval tasks.")
@options.backend("framework that runs the model for --data (--lm-eval always runs it through transformers)")
@click.option("--model", required=True, help="model folder or hub id to evaluate")
@click.option("--recipe", default=None, metavar="NAME|FILE",
              help="take --metric, --extractor, --data (its eval_data) and --temperature from a training "
                   "recipe (a shipped name such as paper-math, or a YAML file); flags you give win")
@click.option("--teacher", "teachers", multiple=True, metavar="[NAME=]MODEL",
              help="teacher folder: also report token-level KL(teacher || model); several as NAME=MODEL "
                   "(repeatable): each held-out row's KL to the teacher its --teacher-column names, reported "
                   "per teacher")
@click.option("--teacher-column", default="teacher", show_default=True,
              help="with named teachers: the row field naming the row's teacher")
@click.option("--default-teacher", default="", help="with named teachers: the teacher of a row that names none")
@click.option("--data", default=None, type=str,
              help="held-out data with reference answers: prompt/completion, messages, ShareGPT or Alpaca "
                   "rows, in JSONL, JSON, Parquet, a datasets folder or a hub dataset id")
@click.option("--data-split", default="", help="split of a datasets folder or hub id [default: test, "
              "validation or train, the first present]")
@click.option("--data-columns", multiple=True, metavar="NAME=COLUMN",
              help="map other column names onto hpd's, e.g. messages=dialog (repeatable)")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="1: greedy decoding; K: mean accuracy over K sampled generations")
@click.option("--metric", default="exact-match", show_default=True,
              type=click.Choice(["exact-match", "rouge-l", "code"]),
              help="how generations are scored: exact-match of --extractor's answer (sampled: pass@1), "
                   "rouge-l against the reference (0-100, as DistiLLM and MiniLLM report it on Dolly), or "
                   "code: pass@1 of the program in each generation with the row's \"test\" field appended, "
                   "run in a sandbox (docs/code-sandbox.md) with a time limit, a memory limit and no network")
@click.option("--extractor", default="answer", show_default=True,
              help="answer extractor: answer (after the last 'Answer:'), last-number, math (the last "
                   "\\boxed{}, else the last number; 1/2, 0.5 and \\frac{1}{2} match), exact, or regex:PATTERN")
@click.option("--code-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="--metric code: seconds one program may run")
@click.option("--code-memory", default=512, show_default=True, type=click.IntRange(min=16),
              help="--metric code: MiB of memory one program may use")
@options.max_new_tokens(128, "longest generation, in new tokens")
@options.temperature("sampling temperature when --samples > 1")
@click.option("--limit", default=0, show_default=True, type=click.IntRange(min=0),
              help="first N rows only, for every metric (and N documents per lm-eval task); 0: all")
@options.batch_size(16, "sequences per forward pass or generation batch (also lm-eval's batch size)")
@click.option("--lm-eval", "lm_eval_tasks", default=None, metavar="TASKS",
              help="also run EleutherAI's lm-evaluation-harness tasks (comma-separated) on --model; "
                   "needs pip install 'hpd-distill[lm-eval]'")
@click.option("--lm-eval-include", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="folder of local lm-eval task YAML files (repeatable)")
@click.option("--num-fewshot", default=None, type=click.IntRange(min=0),
              help="few-shot examples for lm-eval tasks [default: each task's own]")
@options.seed("seed for sampled generations and lm-eval")
@options.dtype("model dtype (auto: bfloat16 on CUDA for inference, float32 on CPU)")
@options.device("device for the torch backend and lm-eval")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@options.progress()
@click.pass_context
def evaluate(ctx, backend, model, recipe, teachers, teacher_column, default_teacher, data, data_split, data_columns,
             samples, metric, extractor, code_timeout, code_memory, max_new_tokens, temperature, limit, batch_size,
             lm_eval_tasks, lm_eval_include, num_fewshot, seed, dtype, device, as_json, progress):
    """Scores of MODEL's generations on DATA (exact match, ROUGE-L or code pass@1), its
    perplexity, and its token-level KL to --teacher; with --lm-eval, lm-evaluation-harness
    tasks on the same folder."""
    from hpd.models.loading import asset_path

    if recipe:
        given = {name for name in ("metric", "extractor", "data", "temperature")
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        metric, extractor, data, temperature = _from_recipe(recipe, given, metric=metric, extractor=extractor,
                                                            data=data, temperature=temperature)

    if not data and not lm_eval_tasks:
        raise click.UsageError("give --data, --lm-eval TASKS, or both")
    if lm_eval_include and not lm_eval_tasks:
        raise click.UsageError("--lm-eval-include needs --lm-eval TASKS")
    if data and metric == "code":  # which of the sandbox's layers hold here, before any program runs
        from hpd.report.sandbox import describe, isolation

        click.echo(describe(isolation()), err=True)
    model = asset_path(model)
    teacher = _teachers(teachers, teacher_column, default_teacher)
    result = {"model": model}
    if data:
        result.update(_held_out(backend, model, teacher, asset_path(data), data_split, list(data_columns),
                                samples, metric, extractor, code_timeout, code_memory, max_new_tokens,
                                temperature, limit, batch_size, seed, dtype, device, progress))
    if lm_eval_tasks:
        from hpd.report.harness import parse_tasks, run_harness

        try:
            result.update(run_harness(model, parse_tasks(lm_eval_tasks), include=list(lm_eval_include),
                                      batch_size=batch_size, limit=limit or None, device=device, dtype=dtype,
                                      num_fewshot=num_fewshot, seed=seed))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for k, v in result.items():
        click.echo(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _teachers(values, column: str, default: str):
    """None, one teacher's folder, or ({name: folder}, Route) for named ones."""
    from hpd.data.routing import Route
    from hpd.models.loading import asset_path
    from hpd.train.config import TEACHER_NAME

    if not values:
        if default:
            raise click.UsageError("--default-teacher names one of the named teachers (--teacher NAME=MODEL)")
        return None
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and TEACHER_NAME.match(name) and path:
            named[name] = asset_path(path)
        elif len(values) == 1:
            return asset_path(value)
        else:
            raise click.BadParameter(f"{value!r}: with several teachers, name each as NAME=MODEL",
                                     param_hint="--teacher")
    if default and default not in named:
        raise click.BadParameter(f"{default!r} is not a named teacher ({', '.join(sorted(named))})",
                                 param_hint="--default-teacher")
    return named, Route(column, tuple(sorted(named)), default)


def _from_recipe(recipe: str, given: set[str], **values) -> tuple:
    """(metric, extractor, data, temperature): the recipe's eval_metric, eval_extractor, eval_data
    and temperature, where the user gave no flag of their own."""
    import yaml

    from hpd.train.config import resolve_recipe

    try:
        fields = yaml.safe_load(resolve_recipe(recipe).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError) as e:
        raise click.BadParameter(str(e), param_hint="--recipe") from None
    if not isinstance(fields, dict):
        raise click.BadParameter(f"{recipe}: a recipe is a mapping of config fields", param_hint="--recipe")
    keys = {"metric": "eval_metric", "extractor": "eval_extractor", "data": "eval_data",
            "temperature": "temperature"}
    for name, key in keys.items():
        if name not in given and fields.get(key) is not None:
            values[name] = fields[key]
    if values["metric"] not in ("exact-match", "rouge-l", "code"):
        raise click.BadParameter(f"{recipe}: eval_metric={values['metric']!r}; allowed: exact-match, rouge-l, code",
                                 param_hint="--recipe")
    return values["metric"], values["extractor"], values["data"], float(values["temperature"])


def _held_out(backend, model, teacher, data, split, columns, samples, metric, extractor, code_timeout,
              code_memory, max_new_tokens, temperature, limit, batch_size, seed, dtype, device, progress) -> dict:
    from hpd.data.examples import check_tokenizers
    from hpd.data.formats import parse_columns
    from hpd.report.evaluate import accuracy, get_extractor, likelihood

    try:
        get_extractor(extractor)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--extractor") from None
    try:
        columns = parse_columns(columns)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--data-columns") from None
    be = options.inference_backend(backend, device, dtype)
    be.seed(seed)
    named, route = teacher if isinstance(teacher, tuple) else ({}, None)
    paths = named or ({"": teacher} if teacher else {})
    try:
        tok = be.load_tokenizer(model)
        for name, path in paths.items():  # the KL compares the models id by id: one tokenizer
            try:
                check_tokenizers(be.load_tokenizer(path), tok)
            except ValueError as e:
                raise ValueError(f"--teacher {name + '=' if name else ''}{path}: {e}; kl_to_teacher compares the "
                                 "models token by token, so it needs the model's tokenizer") from None
        net = be.load_model(model, trainable=False, dtype=dtype)
        refs = {name: be.load_model(path, trainable=False, dtype=dtype) for name, path in paths.items()}
        ref = refs.get("")
        result = {"data": data}
        result.update(accuracy(be, net, tok, data, extractor=extractor, samples=samples, limit=limit or None,
                               max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                               progress=progress, split=split, columns=columns, metric=metric,
                               code_timeout=code_timeout, code_memory_mb=code_memory))
        result.update(likelihood(be, net, tok, data, teacher=ref, batch_size=batch_size, limit=limit or None,
                                 split=split, columns=columns, teachers=refs if named else None, route=route))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    return result
