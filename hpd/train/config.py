"""The run configuration: the single source of defaults, help text and range checks.

A recipe YAML holds these fields; the CLI builds its options from them, and only the
flags a user sets override the recipe.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpd.objectives.rules import METHODS


def _f(default, help: str, choices: tuple | None = None, low=None, high=None, low_open=False, cli=True):
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open, "cli": cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_TEACHER_TOKENIZER = (
    "how the teacher's tokens meet the student's: same (one tokenizer: the teacher reads the student's ids), "
    "cross (another tokenizer: both render each row, targets are paired by their text, and the teacher's "
    "log-probs move to the student's vocabulary at the tokens both share), auto (same when the two "
    "vocabularies are equal token for token, else cross)")
_ROLLOUT_ENGINE = (
    "torch: what generates the student's rollouts (on-policy steps of the schedule): hf (transformers' generate) "
    "or vllm (a vLLM engine in the training process, on every process under torchrun, loaded with the "
    "student's weights before a rollout whenever an optimizer step changed them; each request seeded from "
    "the run's seed, step and row, so --resume repeats it). mlx generates with mlx-lm")
_COMPILE = (
    "torch: torch.compile the student's and the teacher's forwards (lengths padded to --compile-buckets) and "
    "the chunked loss's per-chunk function, the graph count logged as compile/graphs; mlx: run the student's "
    "step under mx.compile where a micro-batch's supervised positions fit one chunk. auto: on CUDA for torch; "
    "off on mlx (not yet measured on Apple silicon)")


@dataclass
class DistillConfig:
    # what to distil
    teacher: str = _f("", "teacher model: a local folder, a hub id, hpd:tiny/teacher (shipped), or a vLLM server's "
                      "URL, http(s)://HOST:PORT/v1 (docs/scale.md); several "
                      "teachers as NAME=SOURCE, repeatable, each row scored by the one its --teacher-column "
                      "names", cli="named:teachers")
    teachers: dict = _f({}, "several teachers by name, NAME: SOURCE (each a --teacher); a row names its own in "
                        "--teacher-column", cli=False)
    student: str = _f("", "student initialisation: a local folder, a hub id, or hpd:tiny/student")
    teacher_cache: str = _f("", "teacher store written by `hpd cache-teacher`: train from it without running "
                            "the teacher (--teacher then serves only a schedule's on-policy steps); a named "
                            "teacher's store as NAME=DIR, repeatable", cli="named:teacher_caches")
    teacher_caches: dict = _f({}, "teacher stores of named teachers, NAME: DIR (each a --teacher-cache)", cli=False)
    teacher_column: str = _f("teacher", "with named teachers: the row field naming the teacher that scores the row")
    default_teacher: str = _f("", "with named teachers: the teacher of a row that names none (without it, such a "
                              "row is refused before training)")
    teacher_offload: bool = _f(False, "with named teachers: keep in memory only the teachers the current batch "
                               "needs (the others wait on the CPU when the student is on CUDA, else are unloaded "
                               "and loaded again when needed); the cost is logged as teacher/load_s")
    # a served teacher (--teacher http(s)://HOST:PORT/v1: a vLLM OpenAI-compatible server)
    teacher_top_k: int = _f(32, "served teacher: log-probs per position asked of the server (the top k, and always "
                            "the data token's); at most the server's --max-logprobs", low=1)
    teacher_prefetch: int = _f(2, "served teacher: steps whose requests are in flight ahead of the one training "
                               "(0: ask when the step needs them); the time a step still waits is teacher/wait_s",
                               low=0)
    teacher_timeout: float = _f(120.0, "served teacher: seconds a request may take before it is retried",
                                low=0.0, low_open=True)
    teacher_retries: int = _f(5, "served teacher: retries of a failed request (after 0.5, 1, 2, ... s) before the "
                              "run stops with a checkpoint", low=0)
    data: str = _f("", "training data: a JSONL, JSON or Parquet file, a datasets save_to_disk folder, or a "
                   "hub dataset id; rows of {messages}, {prompt, completion}, {text}, ShareGPT or Alpaca")
    data_split: str = _f("", "split of a datasets folder or hub id for --data (default: train, or the only one)")
    data_columns: dict = _f({}, "map other column names onto hpd's, NAME=COLUMN (e.g. messages=dialog); "
                            "repeatable", cli="multiple")
    out: str = _f("", "output folder: final student at the top, checkpoints/, metrics.jsonl, config.yaml")
    backend: str = _f("torch", "training backend", choices=("torch", "mlx"))
    teacher_tokenizer: str = _f("auto", _TEACHER_TOKENIZER, choices=("auto", "same", "cross"))
    method: str = _f("hpd", f"distillation objective: {', '.join(METHODS)}")
    method_params: dict = _f({}, "parameters of the method, e.g. {beta: 0.5} for jsd", cli=False)
    temperature: float = _f(1.0, "softmax temperature applied to both models", low=0.0, low_open=True)
    uld_weight: float = _f(0.0, "add ULD's sorted-probability distance (the uld method) with this weight to "
                           "every objective mix (0: off); across tokenizers it is the term that sees the "
                           "teacher's mass on tokens the student's vocabulary lacks", low=0.0)
    schedule: dict = _f({}, "hybrid sampling schedule (on-policy fraction, objective phases)", cli=False)
    # student rollouts (on-policy steps of the schedule)
    rollout_max_new_tokens: int = _f(128, "longest student rollout, in new tokens", low=1)
    rollout_temperature: float = _f(1.0, "sampling temperature of rollouts", low=0.0, low_open=True)
    rollout_top_p: float = _f(1.0, "nucleus sampling of rollouts (1: off)", low=0.0, high=1.0, low_open=True)
    rollout_top_k: int = _f(0, "top-k sampling of rollouts (0: off)", low=0)
    # where the student's rollouts are generated (hpd.train.rollout_vllm)
    rollout_engine: str = _f("hf", _ROLLOUT_ENGINE, choices=("hf", "vllm"))
    rollout_kv_cache_mb: int = _f(0, "--rollout-engine vllm: MiB of KV cache for the engine (0: room for one "
                                  "micro-batch of --rollout-max-model-len sequences); a smaller cache makes vLLM "
                                  "preempt and recompute sequences (slower, the same rollouts)", low=0)
    rollout_max_model_len: int = _f(0, "--rollout-engine vllm: the longest sequence the engine holds, prompt and "
                                    "rollout (0: --max-length); a prompt as long is refused before training",
                                    low=0)
    rollout_vllm_args: list = _f([], "--rollout-engine vllm: more vllm.LLM arguments as KEY=VALUE (e.g. "
                                 "gpu_memory_utilization=0.3); repeatable", cli="multiple")
    # how long
    steps: int = _f(0, "optimizer steps; 0 means derive from --epochs", low=0)
    epochs: float = _f(1.0, "passes over the data when --steps is 0", low=0.0, low_open=True)
    batch_size: int = _f(8, "sequences per micro-batch (per process)", low=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", low=1)
    max_length: int = _f(1024, "longest sequence in tokens; longer rows are truncated", low=2)
    group_by_length: bool = _f(False, "batch rows of similar length together (less padding)")
    packing: bool = _f(False, "pack each micro-batch's rows into few sequences (no wider than its longest "
                       "row), attention kept within rows: padding costs almost nothing")
    # optimisation
    lr: float = _f(1e-5, "peak learning rate", low=0.0, low_open=True)
    lr_schedule: str = _f("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.0, "fraction of steps of linear warmup", low=0.0, high=1.0)
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of the peak", low=0.0, high=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", low=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1", low=0.0, high=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2", low=0.0, high=1.0)
    adam_eps: float = _f(1e-8, "AdamW epsilon", low=0.0, low_open=True)
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 disables", low=0.0)
    seed: int = _f(0, "seed for data order, sampling and schedule decisions")
    # evaluation, checkpoints, logs
    eval_data: str = _f("", "held-out data for evaluation (same kinds and shapes as --data)")
    eval_data_split: str = _f("", "split for --eval-data (default: test, validation or train, the first present)")
    eval_every: int = _f(0, "evaluate every N steps (0: only at the end, when --eval-data is set)", low=0)
    eval_generate: int = _f(0, "at each evaluation, also generate greedily for the first N held-out rows "
                            "and report exact-match accuracy (0: off)", low=0)
    eval_extractor: str = _f("answer", "answer extractor for eval accuracy: answer, last-number, math (the "
                             "last \\boxed{}, else the last number, normalised), exact, or regex:PATTERN")
    eval_metric: str = _f("exact-match", "how `hpd eval --recipe` scores generations: exact-match (of "
                          "eval_extractor's answer; sampled: pass@1), rouge-l (dialogue) or code (pass@1 "
                          "of the row's tests, sandboxed); training-time eval_generate is exact-match",
                          choices=("exact-match", "rouge-l", "code"))
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)", low=0)
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", low=1)
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    overwrite: bool = _f(False, "replace what is in --out (never done silently)")
    allow_config_change: bool = _f(False, "with --resume, accept a change to a field that shapes training "
                                   "(method, lr, steps, schedule, ...); the change is printed and recorded")
    max_bad_steps: int = _f(5, "stop after this many consecutive NaN/Inf losses", low=1)
    # hardware and memory
    dtype: str = _f("auto", "model dtype (auto: student float32, teacher bfloat16 on CUDA and Metal, "
                    "float32 on CPU; the torch student trains under bfloat16 autocast on CUDA)",
                    choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _f("auto", "device for the torch backend", choices=("auto", "cpu", "cuda", "mps"))
    parallel: str = _f("fsdp", "torch under torchrun (several processes): fsdp shards the student's weights, "
                       "gradients and optimizer state across processes; ddp keeps a full copy on each",
                       choices=("fsdp", "ddp"))
    teacher_placement: str = _f("replicate", "torch under torchrun: a full teacher on every process, or "
                                "shard it across processes (inference only: less memory, more traffic)",
                                choices=("replicate", "shard"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    chunked: str = _f("auto", "chunked loss from hidden states (never holds batch x length x vocab)",
                      choices=("auto", "on", "off"))
    chunk_size: str = _f("auto", "supervised positions per chunk on the chunked path, or auto: as many as "
                         "fit --chunk-budget-mb")
    chunk_budget_mb: float = _f(0.0, "auto chunks: MiB for one chunk's (chunk x vocabulary) buffers, about 6 "
                                "float32 arrays; 0 (default): 64, and 1024 with torch on CUDA, where small "
                                "chunks leave the GPU waiting on kernel launches", low=0.0)
    compile: str = _f("auto", _COMPILE, choices=("auto", "on", "off"))
    compile_buckets: str = _f("64", "torch --compile: pad each batch's length up to a multiple of this many "
                              "tokens, or pow2 (the next power of two), so a run compiles one graph per bucket")
    teacher_quantize: int = _f(0, "mlx: quantize the teacher to 4 or 8 bits at load (0: off)", choices=(0, 4, 8))
    # LoRA students (hpd.models.lora): adapters over a frozen base, which may be quantized (QLoRA)
    lora_rank: int = _f(0, "train LoRA adapters of this rank instead of the whole student (0: full "
                        "fine-tuning); mlx-lm's LoRA layers on mlx, peft on torch", low=0)
    lora_alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank on both backends",
                           low=0.0, low_open=True)
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input", low=0.0, high=0.99)
    lora_targets: str = _f("all-linear", "layers that get adapters: all-linear (every linear layer of "
                           "the decoder blocks) or leaf names, e.g. q_proj,v_proj")
    student_quantize: int = _f(0, "QLoRA: quantize the frozen student base to 4 or 8 bits (mlx: mlx-lm "
                               "quantization; torch: bitsandbytes NF4 / int8, on CUDA or, with bitsandbytes' CPU "
                               "kernels, the CPU); needs --lora-rank",
                               choices=(0, 4, 8))
    adapter_only: bool = _f(False, "at the end of a LoRA run, write the adapters (peft/ and mlx-lm/ "
                            "formats) instead of the merged student")
    export_quantized: bool = _f(False, "QLoRA on mlx: export the merged student quantized as mlx-lm's fuse "
                                "writes it (the base's bits and group sizes) for mlx_lm.load, instead of "
                                "dequantized; transformers cannot read mlx quantization")
    progress: bool = _f(True, "show a progress bar on a terminal (--no-progress: only evaluations are printed)")
    log_every: int = _f(0, "print a plain line every N steps (step, loss, kl, lr, tokens/s, ETA) instead of the "
                        "bar; 0: the bar on a terminal, about 20 lines per run otherwise", low=0)
    report_to: list = _f(["none"], "also send every metrics.jsonl record to: none, tensorboard (OUT/runs), "
                         "wandb; repeatable", cli="multiple")
    dry_run: bool = _f(False, "print the memory plan (weights, trainable parameters, gradients, optimizer "
                       "state, activations, loss buffers) from the models' config.json, then stop: nothing "
                       "is loaded, trained or written")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        """The fields given; a `recipe` key (a file or a shipped name) supplies the rest."""
        if d.get("recipe"):
            rest = {k: v for k, v in d.items() if k != "recipe"}
            return cls.from_recipe(d["recipe"], rest)
        d = {k: v for k, v in d.items() if not (k == "recipe" and not v)}
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(cls.field_names())}"
            )
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})

    def __post_init__(self):
        from hpd.models.loading import asset_path

        for name in ("teacher", "student", "data", "eval_data", "teacher_cache"):
            setattr(self, name, asset_path(getattr(self, name)))
        for name in ("teachers", "teacher_caches"):
            setattr(self, name, {str(k): asset_path(str(v)) for k, v in (getattr(self, name) or {}).items()})
        # warnings about the combination of a recipe and its overrides (hpd.train.advice),
        # said at the run's start; not a field: never saved, compared or set by a flag
        self.notes: list[str] = []

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> DistillConfig:
        """A recipe YAML (or a shipped recipe's name) with `overrides` on top. The config's
        `notes` list warnings about the combination (see hpd.train.advice)."""
        name = str(path)
        path = resolve_recipe(path)
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
                line = mark.line + 1 if mark is not None else None
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                if start is not None and getattr(e, "context", None) and start.line + 1 != line:
                    problem += f", {e.context} started at line {start.line + 1}"
                where = f"{path}:{line}: YAML syntax error at line {line}" if line else f"{path}: YAML syntax error"
                raise ValueError(f"{where} ({problem})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of config fields, got {type(data).__name__}")
        merged = {**data, **(overrides or {})}
        try:
            cfg = cls.from_dict(merged)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        from hpd.train.advice import recipe_notes

        cfg.notes = recipe_notes(name, data, overrides or {})
        return cfg

    def has_teacher(self) -> bool:
        """A teacher model, a store, or named ones."""
        return bool(self.teacher or self.teacher_cache or self.teachers or self.teacher_caches)

    def teacher_names(self) -> list[str]:
        """The named teachers, sorted ([] for one unnamed teacher)."""
        return sorted(set(self.teachers) | set(self.teacher_caches))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ validation
    def validate(self, *, require_paths: bool = True) -> DistillConfig:
        """Raise one ValueError listing every problem."""
        from hpd.objectives.rules import TEMPERATURE, get_method, resolve_params

        errors = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
            if choices is not None and value not in choices:
                errors.append(f"{f.name}={value!r}: allowed {', '.join(map(str, choices))}")
            if low is not None and isinstance(value, (int, float)):
                if isinstance(value, float) and not math.isfinite(value):
                    errors.append(f"{f.name}={value}: must be a finite number")
                elif value < low or (meta.get("low_open") and value == low):
                    errors.append(f"{f.name}={value}: must be {'>' if meta.get('low_open') else '>='} {low}")
            if high is not None and isinstance(value, (int, float)) and value > high:
                errors.append(f"{f.name}={value}: must be <= {high}")
        if require_paths:
            for name in ("teacher", "student", "data", "out"):
                if not getattr(self, name) and not (name == "teacher" and self.has_teacher()):
                    errors.append(f"{name} is required (--{name.replace('_', '-')})")
        errors.extend(_check_named_teachers(self))
        try:
            resolve_params(get_method(self.method), dict(self.method_params))
            TEMPERATURE.check(self.method, "temperature", self.temperature)
        except ValueError as e:
            errors.append(str(e))
        if self.schedule:
            try:
                self.schedule_config()
            except ValueError as e:
                errors.append(f"schedule: {e}")
        if not (self.chunk_size == "auto" or (self.chunk_size.isdigit() and int(self.chunk_size) >= 1)):
            errors.append(f"chunk_size={self.chunk_size!r}: allowed auto or a positive integer")
        if not (self.compile_buckets == "pow2" or (self.compile_buckets.isdigit() and int(self.compile_buckets) >= 1)):
            errors.append(f"compile_buckets={self.compile_buckets!r}: allowed pow2 or a positive integer")
        errors.extend(_check_reporting(self))
        if self.eval_every and not self.eval_data:
            errors.append("eval_every is set but eval_data is not")
        if self.eval_generate and self.eval_metric != "exact-match":
            errors.append(f"eval_generate scores exact match during training, not eval_metric={self.eval_metric}; "
                          f"set eval_generate: 0 and score the student with hpd eval --recipe")
        if (self.schedule or {}).get("lambda_schedule") == "adaptive" and not (self.eval_data and self.eval_every):
            errors.append("schedule.lambda_schedule=adaptive reacts to held-out loss: set eval_data and eval_every")
        if self.teacher_cache or self.teacher_caches:
            from hpd.teachers.stored import config_errors

            errors.extend(config_errors(self))

        from hpd.models.lora import config_errors

        errors.extend(config_errors(self))
        from hpd.train.rollout_vllm import config_errors as rollout_errors

        errors.extend(rollout_errors(self))
        if len(errors) == 1:  # one problem, one line
            raise ValueError(f"invalid config: {errors[0]}")
        if errors:
            raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
        return self

    def schedule_config(self):
        from hpd.train.schedule_config import ScheduleConfig

        return ScheduleConfig.from_dict(dict(self.schedule))


def _check_reporting(cfg) -> list[str]:
    from hpd.data.formats import parse_columns
    from hpd.report.reporters import REPORTERS

    errors = [f"report_to={name!r}: allowed {', '.join(REPORTERS)}" for name in cfg.report_to
              if name not in REPORTERS]
    if "none" in cfg.report_to and len(set(cfg.report_to)) > 1:
        errors.append("report_to: 'none' cannot be combined with other targets")
    try:
        parse_columns(cfg.data_columns)
    except ValueError as e:
        errors.append(str(e))
    return errors


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file, or the name of one shipped with hpd (e.g. `tiny`)."""
    p = Path(path)
    if p.exists():
        return p
    import hpd.recipes

    folder = Path(next(iter(hpd.recipes.__path__)))
    for candidate in (folder / str(path), folder / f"{path}.yaml"):
        if candidate.exists():
            return candidate
    shipped = sorted(p.stem for p in folder.glob("*.yaml"))
    raise FileNotFoundError(f"recipe {str(path)!r} not found (neither a file nor a shipped recipe name); "
                            f"shipped recipes: {', '.join(shipped)}")


TEACHER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _check_named_teachers(cfg) -> list[str]:
    names = cfg.teacher_names()
    errors = []
    if cfg.teachers and cfg.teacher:
        errors.append("teacher and teachers: name every teacher (NAME=SOURCE) or give one unnamed teacher")
    if cfg.teacher_caches and cfg.teacher_cache:
        errors.append("teacher_cache and teacher_caches: name every store (NAME=DIR) or give one unnamed store")
    if cfg.teacher_caches and not cfg.teachers and cfg.teacher:
        errors.append("teacher_caches names its teachers: name the teacher too (--teacher NAME=SOURCE)")
    bad = [n for n in names if not TEACHER_NAME.match(n)]
    if bad:
        errors.append(f"teacher names {', '.join(map(repr, bad))}: use letters, digits, _ . - (a letter first)")
    if cfg.default_teacher and cfg.default_teacher not in names:
        known = ", ".join(names) if names else "none: there are no named teachers"
        errors.append(f"default_teacher={cfg.default_teacher!r} is not a named teacher (named: {known})")
    return errors


def _coerce(cls, name: str, value):
    """YAML gives ints for floats (lr: 1) and strings for numbers (1e-5); normalise."""
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if value is None:
        return _default(cls, name)
    try:
        if ftype in ("float", float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if ftype in ("int", int) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if ftype in ("bool", bool):
            if isinstance(value, bool):
                return value
            raise ValueError
        if ftype in ("str", str):
            choices = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices") or ()
            if isinstance(value, bool) and "on" in choices:  # YAML reads `on` / `off` as booleans
                return "on" if value else "off"
            return str(value)
        if ftype in ("dict", dict):
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in value):
                return dict(v.split("=", 1) for v in value)  # NAME=VALUE flags
            if not isinstance(value, dict):
                raise ValueError
            return value
        if ftype in ("list", list):
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {ftype}, got {value!r}") from None
    return value


def _default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


__all__ = ["DistillConfig", "resolve_recipe"]
