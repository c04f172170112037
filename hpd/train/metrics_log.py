"""metrics.jsonl: the run's records, one JSON object per line, each once through kills and resumes."""

from __future__ import annotations

import json
from pathlib import Path


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


__all__ = ["MetricsLog"]
