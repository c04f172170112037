"""`hpd.distill(config)`: set up a run, train it with the loop, export the student.

`distill` holds the output folder's lock and the signal handlers around a `Run`, whose
steps read in order: `setup` (where to resume, the inputs, the models, the training
state, the output files, the loop), `train` (the baseline, the loop, the final
evaluation) and `export`.
"""

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

from hpd.backends import get_backend
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
from hpd.models.export import finalize
from hpd.report.evaluate import EVAL_SPLITS, eval_source
from hpd.teachers import setup as teacher_setup
from hpd.train import checkpoint as ckpt
from hpd.train import resume as resume_check
from hpd.train import rollout_engines
from hpd.train.config import DistillConfig
from hpd.train.interrupt import Interrupted, StopOnSignal, signal_name
from hpd.train.loop import Loop, LoopState
from hpd.train.metrics_log import MetricsLog
from hpd.train.rollout import RolloutEngineError, Sampling, make_rollout


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
            run = Run(cfg, backend, stop, command, loop_hooks)
            try:
                run.setup()
                final = run.train()
                run.export(final)
            finally:
                run.close()
            return {"out": str(out), "steps": run.loop.state.step, "metrics": final, "student": run.student,
                    "tokenizer": run.tokenizer, "backend": backend}
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


class Run:
    """One run's parts, built by `setup` in the order the checks need: nothing is loaded
    before the inputs are valid, and nothing is written before the models load."""

    def __init__(self, cfg: DistillConfig, backend, stop: StopOnSignal, command: str | None, hooks: dict):
        self.cfg, self.backend, self.stop, self.command, self.hooks = cfg, backend, stop, command, hooks
        self.rank, self.out = backend.rank, Path(cfg.out)
        self.saved_at: int | None = None  # the step of the latest checkpoint
        # what generates the rollouts (hpd.train.rollout_engines), unless a hook is given
        self.rollout_engine, self.start_rollouts = None, None

    def say(self, message: str) -> None:
        say(message, self.rank)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.resume_from = self._resume_point()
        for note in self.cfg.notes:
            self.say(f"warning: {note}")
        self._load_inputs()
        self._load_models()
        self._training_state()
        self._open_outputs()
        self._build_loop()

    def _resume_point(self) -> Path | None:
        cfg, out = self.cfg, self.out
        if self.rank == 0:
            found = prepare_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
        else:
            found = ckpt.latest_checkpoint(out) if cfg.resume else None
        self.backend.barrier()
        self.backend.seed(cfg.seed)
        return found

    def _load_inputs(self) -> None:
        """The tokenizers, the data and the teacher's sources, every row checked."""
        cfg, backend = self.cfg, self.backend
        self.tokenizer = backend.load_tokenizer(cfg.student)
        self.teacher = teacher_setup.prepare(cfg, backend, self.tokenizer)
        self.data = load_dataset(cfg.data, self.tokenizer, cfg.max_length, split=cfg.data_split,
                                 columns=cfg.data_columns, route=self.teacher.route)
        self.teacher.check_data(cfg, self.tokenizer, self.data, eval_source(cfg) | {"default_splits": EVAL_SPLITS},
                                self.say)
        data = self.data
        self.say(f"data: {data.rows} rows from {cfg.data}, {len(data)} usable, {data.truncated} truncated "
                 f"to {cfg.max_length} tokens, {data.target_tokens} target tokens")
        if "rollout" not in self.hooks:  # the engine's checks, before any model loads
            self.start_rollouts = rollout_engines.plan(cfg, data)
        self.eval_batches = None
        if cfg.eval_data:
            held = load_dataset(cfg.eval_data, self.tokenizer, cfg.max_length, route=self.teacher.route,
                                **eval_source(cfg)).examples
            self.eval_batches = [collate(held[i:i + cfg.batch_size], pad_id_of(self.tokenizer))
                                 for i in range(0, len(held), cfg.batch_size)]

    def _load_models(self) -> None:
        backend = self.backend
        self.student = student_kind.load_student(backend, self.cfg, self.resume_from, say=self.say)
        self.teacher.load(backend, self.cfg, self.say)
        self.vocab = self.teacher.vocab(backend, self.student)
        if len(self.tokenizer) > self.vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but a model's vocabulary only "
                             f"{self.vocab}")
        if self.start_rollouts is not None:
            self.rollout_engine = self.start_rollouts(backend, self.tokenizer, self.say)

    def _training_state(self) -> None:
        """The batches, the schedule, the optimizer and the loop's counters, restored from a
        checkpoint on resume (after checking what the resumed config changes)."""
        cfg, backend = self.cfg, self.backend
        self.batches = Batches(self.data, cfg.batch_size, pad_id_of(self.tokenizer), seed=cfg.seed,
                               group_by_length=cfg.group_by_length, rank=self.rank,
                               world_size=backend.world_size, packing=cfg.packing)
        self.total = cfg.steps or max(1, math.ceil(cfg.epochs * self.batches.batches_per_epoch / cfg.grad_accum))
        from hpd.train.schedule import Schedule

        self.schedule = Schedule(cfg.schedule_config(), method=cfg.method, method_params=dict(cfg.method_params),
                                 total_steps=self.total, seed=cfg.seed, uld_weight=cfg.uld_weight)
        self.optimizer = backend.make_optimizer(self.student, cfg)
        self.state, self.changes = LoopState(), {}
        if self.resume_from is None:
            return
        saved = ckpt.load_state(self.resume_from, backend, self.student, self.optimizer)
        self.batches.load_state_dict(saved["data"])
        self.schedule.load_state_dict(saved["schedule"])
        self.state = LoopState(**saved["loop"])
        self.saved_at = self.state.step
        self.say(f"resuming from {self.resume_from} (step {self.state.step} of {self.total})")
        before = resume_check.saved_config(saved, self.out)  # every rank checks: all stop together
        self.changes = resume_check.check_resume(
            before, cfg.to_dict(), allow=cfg.allow_config_change, step=self.state.step,
            same_start=lambda: resume_check.same_start(before, cfg, saved.get("total_steps", self.total),
                                                       self.total, self.state.step))

    def _open_outputs(self) -> None:
        """config.yaml and metrics.jsonl, once the inputs are valid: only now is an earlier
        run's output cleared. Only rank 0 writes metrics.jsonl (and trims it on resume)."""
        cfg, out = self.cfg, self.out
        self.run_info = {
            "name": out.name, "backend": cfg.backend, "student": cfg.student, "teacher": self.teacher.name,
            "teacher_cache": cfg.teacher_cache, "method": cfg.method, "method_params": dict(cfg.method_params),
            "temperature": cfg.temperature, "data": cfg.data, "data_sha256": fingerprint(cfg.data),
            "schedule": dict(cfg.schedule), "command": self.command or "hpd.distill(...)",
        }
        self.manifest = None  # what this run writes, for a later --overwrite
        if self.rank == 0:
            self.manifest = ensure_writable(out, cfg.overwrite) if self.resume_from is None else Manifest(out)
            with self.manifest.recording():
                if self.resume_from is None:
                    (out / "config.yaml").write_text(cfg.to_yaml())
                elif self.changes:  # config.yaml stays the first run's; each change is kept in the history
                    history = resume_check.record_history(out, self.state.step, self.changes,
                                                          self.command or "hpd.distill(...)")
                    self.say(f"resuming with a changed config: {resume_check.describe(self.changes)} "
                             f"(recorded in {history.name})")
                (out / "metrics.jsonl").touch()
        resumed = self.state.step if self.resume_from and self.rank == 0 else None
        self.metrics_log = MetricsLog(out / "metrics.jsonl", resumed,
                                      sinks=_sinks(cfg, out, self.total, self.state.step) if self.rank == 0 else ())

    def _build_loop(self) -> None:
        cfg, backend, hooks = self.cfg, self.backend, self.hooks
        self.chunked, self.loss_path = choose_loss_path(cfg.chunked, backend, student=self.student,
                                                        **self.teacher.models())
        hooks.setdefault("teacher_source", self.teacher.hook())
        hooks.setdefault("rollout", make_rollout(Sampling(
            cfg.rollout_max_new_tokens, cfg.rollout_temperature, cfg.rollout_top_p, cfg.rollout_top_k),
            self.rollout_engine))
        self.loop = Loop(backend=backend, config=cfg, student=self.student, teacher=self.teacher.model,
                         tokenizer=self.tokenizer, optimizer=self.optimizer, batches=self.batches,
                         schedule=self.schedule, total_steps=self.total, vocab=self.vocab, chunked=self.chunked,
                         state=self.state, eval_batches=self.eval_batches, eval_kl=self.teacher.scores_eval,
                         log=self.metrics_log, save=self.save,
                         should_stop=lambda: backend.all_reduce_sum(float(self.stop.requested)) > 0, **hooks)

    # ------------------------------------------------------------------ checkpoints
    def save(self, loop: Loop) -> None:
        """A checkpoint of the loop's step (every rank takes part where the backend saves
        collectively)."""
        backend = self.backend
        if self.rank != 0 and not backend.collective_checkpoint:
            return
        step = loop.state.step
        if self.rank == 0:
            self.manifest.own_folder(ckpt.temp_folder(self.out, step, backend.collective_checkpoint))
            self.manifest.own_folder(ckpt.checkpoint_root(self.out) / f"step-{step}")
        ckpt.save_checkpoint(self.out, step, backend, self.student, self.tokenizer, self.optimizer, {
            "data": self.batches.state_dict(), "schedule": self.schedule.state_dict(),
            "loop": loop.state.to_dict(), "total_steps": self.total, "run_info": self.run_info,
            "config": self.cfg.to_dict()}, keep=self.cfg.keep_checkpoints)
        self.saved_at = step

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """The loop's steps between the before and after measures; the final metrics."""
        cfg, backend = self.cfg, self.backend
        per_step = cfg.batch_size * cfg.grad_accum * backend.world_size
        processes = f"{backend.world_size} process{'es' if backend.world_size > 1 else ''}"
        self.say(f"distilling {cfg.teacher or cfg.teacher_cache or self.teacher.name} -> {cfg.student} with "
                 f"{cfg.method} on "
                 f"{cfg.backend}: {self.total} steps of {per_step} sequences ({cfg.batch_size} per batch x "
                 f"{cfg.grad_accum} accumulated x {processes}); {self.loss_path}{self.teacher.describe()}")
        baseline = self._baseline()
        try:
            try:
                last = self.loop.run()
            except RolloutEngineError as e:  # the last finished step is kept, then one line
                raise RolloutEngineError(f"{e}: {self._checkpoint_now()}") from None
            if self.loop.state.step < self.total:  # a signal stopped the loop: checkpoint, then say how to go on
                self._stop_with_checkpoint()
        except BaseException:
            self.metrics_log.close()
            raise
        final = {k: v for k, v in last.items() if not k.startswith("schedule/")}
        final.update({f"eval/{k}_accuracy_before": v for k, v in baseline.items()})
        if self.eval_batches:
            evaluation = self.loop.evaluate()
            final.update(evaluation)
            if self.rank == 0:
                self.metrics_log({"step": self.loop.state.step, **evaluation})
        return final

    def _baseline(self) -> dict[str, float]:
        """Held-out exact match before distilling (measured by a run's first part, read
        back on resume)."""
        cfg = self.cfg
        if not (cfg.eval_generate and self.eval_batches):
            return {}
        if self.resume_from is not None:
            return _logged_baseline(self.out / "metrics.jsonl")
        baseline = _accuracy_baseline(self.backend, self.student, self.teacher.model, self.tokenizer, cfg,
                                      self.teacher.tokenizer)
        self.say("held-out exact match before distilling: " + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()))
        if self.rank == 0:
            self.metrics_log({"step": 0, "eval/accuracy": baseline["student"],
                              **({"eval/teacher_accuracy": baseline["teacher"]} if "teacher" in baseline else {})})
        return baseline

    def _stop_with_checkpoint(self) -> None:
        signum = self.stop.signum or signal.SIGTERM  # another rank may have received it
        raise Interrupted(f"{signal_name(signum)} at step {self.loop.state.step} of {self.total}: "
                          f"{self._checkpoint_now()}", signum)

    def _checkpoint_now(self) -> str:
        """A checkpoint of the loop's step (unless the latest is one), and how to go on from it."""
        loop = self.loop
        if self.saved_at != loop.state.step:
            self.save(loop)
        command = self.command
        if command:
            again = command if "--resume" in command.split() else f"{command} --resume"
        else:
            again = "hpd.distill(..., resume=True)"
        where = ckpt.checkpoint_root(self.out) / f"step-{loop.state.step}"
        return f"checkpoint written to {where}; resume with: {again}"

    def close(self) -> None:
        """Stop what the run started beside the models (a rollout engine); under torchrun this
        comes last, since vLLM's shutdown takes the default process group down with it."""
        engine, self.rollout_engine = self.rollout_engine, None
        if engine is not None:
            engine.close()

    # ------------------------------------------------------------------ export
    def export(self, final: dict) -> None:
        """The last checkpoint, then the student at the top of the output folder with its card."""
        cfg, backend, out = self.cfg, self.backend, self.out
        self.save(self.loop)
        started = time.perf_counter()
        with self.manifest.recording() if self.rank == 0 else nullcontext():
            if self.rank == 0 or backend.collective_checkpoint:
                student_kind.export(backend, self.student, self.tokenizer, out, adapter_only=cfg.adapter_only,
                                    quantized=cfg.export_quantized)
            if self.rank == 0:
                finalize(out, self.tokenizer, {
                    **self.run_info, "steps": self.loop.state.step, "final_metrics": final,
                    **student_kind.card_info(self.student, cfg.adapter_only, cfg.export_quantized)})
                self.metrics_log.close()
                _own_report_folders(self.manifest, out)
        self.say(f"exported the student to {out} ({time.perf_counter() - started:.1f} s)")
        backend.barrier()


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
