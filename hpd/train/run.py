"""`hpd.distill(config)`: set up a run, train it with the loop, export the student."""

from __future__ import annotations

import json
import math
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hpd.data.batches import Batches, collate, load_dataset
from hpd.data.examples import pad_id_of
from hpd.data.sources import fingerprint
from hpd.files.outdir import (
    Manifest,
    OutputLock,
    check_writable,
    ensure_writable,
    make_dir,
    remove_if_untouched,
)
from hpd.models import student as student_kind
from hpd.backends import get_backend
from hpd.models.export import finalize
from hpd.report.evaluate import EVAL_SPLITS, eval_source
from hpd.teachers.cross import choose_mode, cross_source, prepare_for_run
from hpd.train import checkpoint as ckpt
from hpd.train import resume as resume_check
from hpd.train.config import DistillConfig
from hpd.train.interrupt import Interrupted, StopOnSignal, signal_name
from hpd.train.loop import Loop, LoopState, live_teacher


def say(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (its state checked), or None for a fresh run (the
    folder then holds nothing but hpd's bookkeeping)."""
    if resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        ckpt.read_state(latest)
        return latest
    check_writable(out, overwrite)  # cleared once the inputs load (a bad input loses nothing)
    return None


def _record_key(record: dict) -> tuple:
    """What makes a record unique: its step and kind (a skipped step also by its count)."""
    if record.get("skipped"):
        return record.get("step"), "skipped", record.get("skipped_steps")
    return record.get("step"), "train" if "loss" in record else "eval"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each record once whatever the kills and
    resumes: on resume, lines past the checkpoint (and a line torn by a kill) are dropped,
    and a record already there (the final evaluation of a finished run) is not repeated."""

    def __init__(self, path: Path, resume_step: int | None, sinks=()):
        self.path = path
        self.seen: set[tuple] = set()
        self.sinks = list(sinks)  # each record also goes to these (hpd.report.reporters, hpd.report.console)
        if resume_step is not None and path.exists():
            kept = []
            for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(ln)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(record)
            self.seen = {_record_key(r) for r in kept}
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def __call__(self, record: dict) -> None:
        key = _record_key(record)
        if key in self.seen:
            return
        self.seen.add(key)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []  # once: a failed run closes them on its way out
        for sink in sinks:
            sink.close()


def distill(config: DistillConfig | dict, *, command: str | None = None, **loop_hooks: Any) -> dict:
    """Train and export; rank 0 holds a lock on the output folder meanwhile, and SIGINT or
    SIGTERM stop the run after the current step with a checkpoint (`Interrupted`)."""
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(dict(config))
    cfg.validate()
    if cfg.dry_run:
        from hpd.models.memory import dry_run

        say(dry_run(cfg))
        return {"out": None, "steps": 0, "metrics": {}, "dry_run": True}
    backend = get_backend(cfg.backend, cfg)
    student_kind.check_student(backend, cfg)  # before the output folder is touched
    out = Path(cfg.out)
    lock = None
    created = backend.rank == 0 and not out.exists()
    if backend.rank == 0 and not (cfg.resume and not out.is_dir()):
        if not cfg.resume:  # a folder that will be refused gets no lock file either
            check_writable(out, cfg.overwrite)
        lock = OutputLock(make_dir(out)).acquire()
    try:
        with StopOnSignal() as stop:
            return _distill(cfg, backend, stop, command=command, **loop_hooks)
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
        if created:  # refused before anything was written: leave no folder behind
            remove_if_untouched(out)
        raise
    finally:
        if lock is not None:
            lock.release()


def _distill(cfg: DistillConfig, backend, stop: StopOnSignal, *, command: str | None, **loop_hooks: Any) -> dict:
    rank = backend.rank
    out = Path(cfg.out)
    resume_from = prepare_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite) if rank == 0 else None
    if rank != 0 and cfg.resume:
        resume_from = ckpt.latest_checkpoint(out)
    backend.barrier()
    backend.seed(cfg.seed)
    for note in getattr(cfg, "notes", []):
        say(f"warning: {note}", rank)

    tokenizer = backend.load_tokenizer(cfg.student)
    teacher_tokenizer, tokens_line, mode = None, "", "same"
    if cfg.teacher:  # one tokenizer, or another one (hpd.teachers.cross), chosen here and said on the start line
        teacher_tokenizer = backend.load_tokenizer(cfg.teacher)
        try:
            mode, why = choose_mode(cfg.teacher_tokenizer, tokenizer, teacher_tokenizer)
        except ValueError as e:
            raise ValueError(f"--teacher-tokenizer {cfg.teacher_tokenizer}: {e}; pass --teacher-tokenizer cross "
                             "(or auto) to distil across tokenizers") from None
        tokens_line = f"; teacher tokenizer: {mode} ({why})"
    data = load_dataset(cfg.data, tokenizer, cfg.max_length, split=cfg.data_split, columns=cfg.data_columns)
    cross = None
    if mode == "cross":  # every row paired before any model loads: a bad row stops here
        cross = prepare_for_run(cfg, tokenizer, teacher_tokenizer, eval_source(cfg) | {"default_splits": EVAL_SPLITS})
        say(f"teacher tokenizer: cross: {cross.describe()}", rank)
    store = None
    if cfg.teacher_cache:  # checked against this data, tokenizer and settings before any model loads
        from hpd.teachers.stored import open_for_run

        store = open_for_run(cfg, tokenizer, data)
    say(f"data: {data.rows} rows from {cfg.data}, {len(data)} usable, {data.truncated} truncated "
        f"to {cfg.max_length} tokens, {data.target_tokens} target tokens", rank)
    eval_batches = None
    if cfg.eval_data:
        held = load_dataset(cfg.eval_data, tokenizer, cfg.max_length, **eval_source(cfg))
        ex = held.examples
        eval_batches = [collate(ex[i:i + cfg.batch_size], pad_id_of(tokenizer))
                        for i in range(0, len(ex), cfg.batch_size)]

    student = student_kind.load_student(backend, cfg, resume_from, say=lambda m: say(m, rank))
    teacher = None
    if cfg.teacher:
        teacher = backend.load_model(cfg.teacher, trainable=False, dtype=cfg.dtype, quantize=cfg.teacher_quantize)
    vocab = min(backend.vocab_size(student), store.vocab if teacher is None else
                backend.vocab_size(student if cross else teacher))
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but a model's vocabulary only {vocab}")

    batches = Batches(data, cfg.batch_size, pad_id_of(tokenizer), seed=cfg.seed,
                      group_by_length=cfg.group_by_length, rank=rank, world_size=backend.world_size,
                      packing=cfg.packing)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * batches.batches_per_epoch / cfg.grad_accum))
    from hpd.train.schedule import Schedule

    schedule = Schedule(cfg.schedule_config(), method=cfg.method, method_params=dict(cfg.method_params),
                        total_steps=total, seed=cfg.seed, uld_weight=cfg.uld_weight)
    optimizer = backend.make_optimizer(student, cfg)
    state = LoopState()
    if resume_from is not None:
        saved = ckpt.load_state(resume_from, backend, student, optimizer)
        batches.load_state_dict(saved["data"])
        schedule.load_state_dict(saved["schedule"])
        state = LoopState(**saved["loop"])
        say(f"resuming from {resume_from} (step {state.step} of {total})", rank)
    changes: dict = {}
    if resume_from is not None:  # every rank checks, so that all stop together on a refusal
        before = resume_check.saved_config(saved, out)
        changes = resume_check.check_resume(
            before, cfg.to_dict(), allow=cfg.allow_config_change, step=state.step,
            same_start=lambda: resume_check.same_start(before, cfg, saved.get("total_steps", total), total,
                                                       state.step))

    chunked, loss_path = choose_loss_path(cfg.chunked, backend, student=student, teacher=teacher)
    live = live_teacher if cross is None else cross_source(cross)
    if store is not None:
        from hpd.teachers.stored import store_source

        loop_hooks.setdefault("teacher_source", store_source(store, live))
    elif cross is not None:
        loop_hooks.setdefault("teacher_source", live)
    run_info = {
        "name": out.name, "backend": cfg.backend, "student": cfg.student,
        "teacher": cfg.teacher or store.provenance["teacher"], "teacher_cache": cfg.teacher_cache,
        "method": cfg.method, "method_params": dict(cfg.method_params), "temperature": cfg.temperature,
        "data": cfg.data, "data_sha256": fingerprint(cfg.data), "schedule": dict(cfg.schedule),
        "command": command or "hpd.distill(...)",
    }
    manifest = None  # what this run writes, for a later --overwrite
    if rank == 0:
        # the inputs are valid: only now is an earlier run cleared
        manifest = ensure_writable(out, cfg.overwrite) if resume_from is None else Manifest(out)
        with manifest.recording():
            if resume_from is None:
                (out / "config.yaml").write_text(cfg.to_yaml())
            elif changes:  # config.yaml stays the first run's; each change is kept in the history
                history = resume_check.record_history(out, state.step, changes, command or "hpd.distill(...)")
                say(f"resuming with a changed config: {resume_check.describe(changes)} (recorded in "
                    f"{history.name})", rank)
            (out / "metrics.jsonl").touch()
    # only rank 0 writes metrics.jsonl (and trims it on resume)
    metrics_log = MetricsLog(out / "metrics.jsonl", state.step if resume_from and rank == 0 else None,
                             sinks=_sinks(cfg, out, total, state.step) if rank == 0 else ())
    # a backend with collective_checkpoint (torch under torchrun) needs every rank in saves
    collective = getattr(backend, "collective_checkpoint", False)
    saved_at = [state.step if resume_from is not None else None]

    def save(loop: Loop) -> None:
        if rank != 0 and not collective:
            return
        step = loop.state.step
        if rank == 0:
            manifest.own_folder(ckpt.temp_folder(out, step, collective))
            manifest.own_folder(ckpt.checkpoint_root(out) / f"step-{step}")
        ckpt.save_checkpoint(out, step, backend, student, tokenizer, optimizer, {
            "data": batches.state_dict(), "schedule": schedule.state_dict(), "loop": loop.state.to_dict(),
            "total_steps": total, "run_info": run_info, "config": cfg.to_dict()}, keep=cfg.keep_checkpoints)
        saved_at[0] = step

    from hpd.train.rollout import Sampling, make_rollout

    loop_hooks.setdefault("rollout", make_rollout(Sampling(
        cfg.rollout_max_new_tokens, cfg.rollout_temperature, cfg.rollout_top_p, cfg.rollout_top_k)))
    loop = Loop(backend=backend, config=cfg, student=student, teacher=teacher, tokenizer=tokenizer,
                optimizer=optimizer, batches=batches, schedule=schedule, total_steps=total, vocab=vocab,
                chunked=chunked, state=state, eval_batches=eval_batches, log=metrics_log, save=save,
                should_stop=lambda: backend.all_reduce_sum(float(stop.requested)) > 0, **loop_hooks)
    per_step = cfg.batch_size * cfg.grad_accum * backend.world_size
    say(f"distilling {cfg.teacher or cfg.teacher_cache} -> {cfg.student} with {cfg.method} on {cfg.backend}: "
        f"{total} steps of {per_step} sequences ({cfg.batch_size} per batch x {cfg.grad_accum} accumulated "
        f"x {backend.world_size} process{'es' if backend.world_size > 1 else ''}); {loss_path}{tokens_line}", rank)
    baseline = {}
    if cfg.eval_generate and eval_batches and resume_from is not None:  # measured before the first run
        baseline = _logged_baseline(out / "metrics.jsonl")
    if cfg.eval_generate and eval_batches and resume_from is None:
        baseline = _accuracy_baseline(backend, student, teacher, tokenizer, cfg, teacher_tokenizer)
        say("held-out exact match before distilling: " + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()),
            rank)
        if rank == 0:
            metrics_log({"step": 0, "eval/accuracy": baseline["student"],
                         **({"eval/teacher_accuracy": baseline["teacher"]} if "teacher" in baseline else {})})
    try:
        last = loop.run()
        if loop.state.step < total:  # a signal stopped the loop: checkpoint, then say how to go on
            _stop_with_checkpoint(loop, save, saved_at[0], stop, out, total, command)
    except BaseException:
        metrics_log.close()
        raise
    final = {k: v for k, v in last.items() if not k.startswith("schedule/")}
    final.update({f"eval/{k}_accuracy_before": v for k, v in baseline.items()})
    if eval_batches:
        evaluation = loop.evaluate()
        final.update(evaluation)
        if rank == 0:
            metrics_log({"step": loop.state.step, **evaluation})
    save(loop)
    started = time.perf_counter()
    with manifest.recording() if rank == 0 else nullcontext():
        if rank == 0 or collective:
            student_kind.export(backend, student, tokenizer, out, adapter_only=cfg.adapter_only,
                                quantized=cfg.export_quantized)
        if rank == 0:
            finalize(out, tokenizer, {**run_info, "steps": loop.state.step, "final_metrics": final,
                                      **student_kind.card_info(student, cfg.adapter_only, cfg.export_quantized)})
            metrics_log.close()
            _own_report_folders(manifest, out)
    say(f"exported the student to {out} ({time.perf_counter() - started:.1f} s)", rank)
    backend.barrier()
    return {"out": str(out), "steps": loop.state.step, "metrics": final, "student": student,
            "tokenizer": tokenizer, "backend": backend}


def choose_loss_path(mode: str, backend, **models) -> tuple[bool, str]:
    """(chunked?, a line saying which loss path and why). `on` refuses a head the
    chunked loss cannot compute exactly rather than computing a different loss."""
    blockers = {name: backend.chunked_blocker(m) for name, m in models.items() if m is not None}
    blocked = {name: why for name, why in blockers.items() if why}
    if mode == "off":
        return False, "plain loss (--chunked off)"
    if blocked:
        reasons = "; ".join(f"the {name}: {why}" for name, why in blocked.items())
        if mode == "on":
            raise ValueError(f"--chunked on: the chunked loss cannot compute these logits exactly ({reasons}); "
                             "use --chunked auto or off")
        return False, f"plain loss (the chunked path cannot serve {reasons})"
    heads = ", ".join(f"{name} head {backend.head_of(m).describe()}" for name, m in models.items() if m is not None)
    return True, f"chunked loss over supervised positions ({heads})"


def _stop_with_checkpoint(loop: Loop, save, saved_at, stop: StopOnSignal, out: Path, total: int,
                          command: str | None) -> None:
    if saved_at != loop.state.step:
        save(loop)
    signum = stop.signum or signal.SIGTERM  # another rank may have received it
    if command:
        again = command if "--resume" in command.split() else f"{command} --resume"
    else:
        again = "hpd.distill(..., resume=True)"
    where = ckpt.checkpoint_root(out) / f"step-{loop.state.step}"
    raise Interrupted(f"{signal_name(signum)} at step {loop.state.step} of {total}: checkpoint written to "
                      f"{where}; resume with: {again}", signum)


def _logged_baseline(path: Path) -> dict[str, float]:
    """The before-training accuracies a resumed run's first part logged at step 0."""
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == 0 and "eval/accuracy" in record:
            found = {"student": record["eval/accuracy"]}
            if "eval/teacher_accuracy" in record:
                found["teacher"] = record["eval/teacher_accuracy"]
            return found
    return {}


def _own_report_folders(manifest: Manifest, out: Path) -> None:
    """--report-to writes runs/ (tensorboard) and wandb/: hpd's, for a later --overwrite."""
    for name in ("runs", "wandb"):
        if (out / name).is_dir():
            manifest.own_folder(out / name)


def _accuracy_baseline(backend, student, teacher, tokenizer, cfg, teacher_tokenizer=None) -> dict[str, float]:
    from hpd.report.evaluate import accuracy

    def acc(model, tok):  # each model prompted through its own tokenizer and template
        return accuracy(backend, model, tok, cfg.eval_data, extractor=cfg.eval_extractor,
                        limit=cfg.eval_generate, max_new_tokens=cfg.rollout_max_new_tokens,
                        progress=False, **eval_source(cfg))["accuracy"]

    return {"student": acc(student, tokenizer),
            **({"teacher": acc(teacher, teacher_tokenizer or tokenizer)} if teacher is not None else {})}


def _sinks(cfg, out: Path, total: int, initial: int) -> list:
    """The console (bar or plain lines) and the --report-to targets, fed every metrics record."""
    from hpd.report.console import Console
    from hpd.report.reporters import open_reporters

    return [Console(total, initial, progress=cfg.progress, log_every=cfg.log_every),
            *open_reporters(cfg.report_to, out, cfg.to_dict())]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["hpd", *sys.argv[1:]])
