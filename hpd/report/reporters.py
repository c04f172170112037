"""Where metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, the console.

Every record written to metrics.jsonl (training steps, evaluations, the baseline) is
handed to each reporter the run was asked for (`--report-to`, repeatable). The
libraries are optional extras, imported only when chosen; none of them imports torch,
so an MLX run stays free of it (TensorBoard events are written with tensorboard's own
event writer, or tensorboardX where tensorboard is absent).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

REPORTERS = ("none", "tensorboard", "wandb")


def numbers(record: dict) -> dict[str, float]:
    """The record's numeric values: a skipped step's null (or, in older runs, its string
    "nan") stays in the JSON only, as do flags such as `skipped: true`."""
    if record.get("skipped"):  # not a step taken: only the running count of skipped ones
        record = {"skipped_steps": record.get("skipped_steps", 0)}
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardReporter:
    """Scalars under OUT/runs/, one tag per metric, at the record's step."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._event, self._summary = event_pb2.Event, summary_pb2.Summary
            self._writer = EventFileWriter(str(logdir))
            self._add = lambda tag, value, step: self._writer.add_event(self._event(
                wall_time=time.time(), step=step,
                summary=self._summary(value=[self._summary.Value(tag=tag, simple_value=value)])))
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("--report-to tensorboard needs tensorboard: "
                                  "pip install 'hpd-distill[tensorboard]'") from None
            self._writer = SummaryWriter(str(logdir))
            self._add = lambda tag, value, step: self._writer.add_scalar(tag, value, step)

    def __call__(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in numbers(record).items():
            self._add(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """One wandb run per distillation, the config attached; WANDB_MODE=offline works without a network."""

    def __init__(self, out: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("--report-to wandb needs wandb: pip install 'hpd-distill[wandb]'") from None
        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        # a run of its own, logged through its handle: a run the caller has open is left alone
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hpd"), name=out.name,
                               dir=str(out), config=config, reinit="create_new")

    def __call__(self, record: dict) -> None:
        self._run.log(numbers(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


def open_reporters(names, out: Path, config: dict) -> list:
    """The reporters named (an unknown name is caught by config validation)."""
    reporters = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            reporters.append(TensorBoardReporter(out / "runs"))
        elif name == "wandb":
            reporters.append(WandbReporter(out, config))
    return reporters
