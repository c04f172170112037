"""`hpd.distill(config)`: set up a run, train it with the loop, export the student."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from hpd import checkpoint as ckpt
from hpd import student as student_kind
from hpd.backend import get_backend
from hpd.config import DistillConfig
from hpd.data import Batches, check_tokenizers, collate, load_dataset, pad_id_of
from hpd.export import ensure_writable, finalize, sha256_of
from hpd.loop import Loop, LoopState


def say(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (the folder is then empty)."""
    if resume:
        latest = ckpt.latest_checkpoint(out)
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        return latest
    ensure_writable(out, overwrite)
    return None


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def distill(config: DistillConfig | dict, *, command: str | None = None, **loop_hooks: Any) -> dict:
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(dict(config))
    cfg.validate()
    if cfg.dry_run:
        from hpd.memory import dry_run

        say(dry_run(cfg))
        return {"out": None, "steps": 0, "metrics": {}, "dry_run": True}
    backend = get_backend(cfg.backend, cfg)
    rank = backend.rank
    out = Path(cfg.out)
    student_kind.check_student(backend, cfg)  # before the output folder is touched
    resume_from = prepare_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite) if rank == 0 else None
    if rank != 0 and cfg.resume:
        resume_from = ckpt.latest_checkpoint(out)
    backend.barrier()
    backend.seed(cfg.seed)

    tokenizer = backend.load_tokenizer(cfg.student)
    check_tokenizers(backend.load_tokenizer(cfg.teacher), tokenizer)
    data = load_dataset(cfg.data, tokenizer, cfg.max_length)
    say(f"data: {data.rows} rows from {cfg.data}, {len(data)} usable, {data.truncated} truncated "
        f"to {cfg.max_length} tokens, {data.target_tokens} target tokens", rank)
    eval_batches = None
    if cfg.eval_data:
        held = load_dataset(cfg.eval_data, tokenizer, cfg.max_length)
        ex = held.examples
        eval_batches = [collate(ex[i:i + cfg.batch_size], pad_id_of(tokenizer))
                        for i in range(0, len(ex), cfg.batch_size)]

    student = student_kind.load_student(backend, cfg, resume_from, say=lambda m: say(m, rank))
    teacher = backend.load_model(cfg.teacher, trainable=False, dtype=cfg.dtype, quantize=cfg.teacher_quantize)
    vocab = min(backend.vocab_size(student), backend.vocab_size(teacher))
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but a model's vocabulary only {vocab}")

    batches = Batches(data, cfg.batch_size, pad_id_of(tokenizer), seed=cfg.seed,
                      group_by_length=cfg.group_by_length, rank=rank, world_size=backend.world_size)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * batches.batches_per_epoch / cfg.grad_accum))
    from hpd.schedule import Schedule

    schedule = Schedule(cfg.schedule_config(), method=cfg.method, method_params=dict(cfg.method_params),
                        total_steps=total, seed=cfg.seed)
    optimizer = backend.make_optimizer(student, cfg)
    state = LoopState()
    if resume_from is not None:
        saved = ckpt.load_state(resume_from, backend, student, optimizer)
        batches.load_state_dict(saved["data"])
        schedule.load_state_dict(saved["schedule"])
        state = LoopState(**saved["loop"])
        say(f"resuming from {resume_from} (step {state.step} of {total})", rank)

    chunked, loss_path = choose_loss_path(cfg.chunked, backend, student=student, teacher=teacher)
    run_info = {
        "name": out.name, "backend": cfg.backend, "teacher": cfg.teacher, "student": cfg.student,
        "method": cfg.method, "method_params": dict(cfg.method_params), "temperature": cfg.temperature,
        "data": cfg.data, "data_sha256": sha256_of(cfg.data), "schedule": dict(cfg.schedule),
        "command": command or "hpd.distill(...)",
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    # only rank 0 writes metrics.jsonl (and trims it on resume)
    metrics_log = MetricsLog(out / "metrics.jsonl", state.step if resume_from and rank == 0 else None)
    # a backend with collective_checkpoint (torch under torchrun) needs every rank in saves
    collective = getattr(backend, "collective_checkpoint", False)

    def save(loop: Loop) -> None:
        if rank != 0 and not collective:
            return
        ckpt.save_checkpoint(out, loop.state.step, backend, student, tokenizer, optimizer, {
            "data": batches.state_dict(), "schedule": schedule.state_dict(), "loop": loop.state.to_dict(),
            "total_steps": total, "run_info": run_info}, keep=cfg.keep_checkpoints)

    from hpd.rollout import Sampling, make_rollout

    loop_hooks.setdefault("rollout", make_rollout(Sampling(
        cfg.rollout_max_new_tokens, cfg.rollout_temperature, cfg.rollout_top_p, cfg.rollout_top_k)))
    loop = Loop(backend=backend, config=cfg, student=student, teacher=teacher, tokenizer=tokenizer,
                optimizer=optimizer, batches=batches, schedule=schedule, total_steps=total, vocab=vocab,
                chunked=chunked, state=state, eval_batches=eval_batches, log=metrics_log, save=save,
                **loop_hooks)
    say(f"distilling {cfg.teacher} -> {cfg.student} with {cfg.method} on {cfg.backend}: "
        f"{total} steps of {cfg.batch_size} x {cfg.grad_accum} x {backend.world_size} sequences; "
        f"{loss_path}", rank)
    baseline = {}
    if cfg.eval_generate and eval_batches and resume_from is None:
        baseline = _accuracy_baseline(backend, student, teacher, tokenizer, cfg)
        say("held-out exact match before distilling: student {student:.3f}, teacher {teacher:.3f}"
            .format(**baseline), rank)
        if rank == 0:
            metrics_log({"step": 0, "eval/accuracy": baseline["student"], "eval/teacher_accuracy": baseline["teacher"]})
    started = time.perf_counter()
    progress = _progress_bar(total, state.step, enabled=cfg.progress and rank == 0)
    try:
        last = loop.run(progress)
    finally:
        if progress is not None:
            progress.close()
    final = {k: v for k, v in last.items() if not k.startswith("schedule/")}
    final.update({f"eval/{k}_accuracy_before": v for k, v in baseline.items()})
    if eval_batches:
        evaluation = loop.evaluate()
        final.update(evaluation)
        if rank == 0:
            metrics_log({"step": loop.state.step, **evaluation})
    save(loop)
    if rank == 0 or collective:
        student_kind.export(backend, student, tokenizer, out, adapter_only=cfg.adapter_only)
    if rank == 0:
        finalize(out, tokenizer, {**run_info, "steps": loop.state.step, "final_metrics": final,
                                  **student_kind.card_info(student, cfg.adapter_only)})
        say(f"exported the student to {out} ({time.perf_counter() - started:.0f} s)", rank)
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


def _accuracy_baseline(backend, student, teacher, tokenizer, cfg) -> dict[str, float]:
    from hpd.evaluate import accuracy

    def acc(model):
        return accuracy(backend, model, tokenizer, cfg.eval_data, extractor=cfg.eval_extractor,
                        limit=cfg.eval_generate, max_new_tokens=cfg.rollout_max_new_tokens,
                        progress=False)["accuracy"]

    return {"student": acc(student), "teacher": acc(teacher)}


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="distill", unit="step", dynamic_ncols=True)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["hpd", *sys.argv[1:]])
