"""Several named teachers in one run, each row scored by the teacher its column names.

Each named teacher is a `RunTeacher` of its own (a model of the student's tokenizer or of
another, a store, or both), set up and checked like the one teacher of a plain run. The
rows name theirs in `--teacher-column` (hpd.data.routing), checked with `file:line` before
any model loads. Each step, every teacher scores only its rows, in one pass per teacher
(`hpd.teachers.routed`). With `--teacher-offload`, only the teachers the current batch
needs are in memory; the others are unloaded and loaded again when a batch needs them.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hpd.data.routing import Route, prompt_routes, take_rows
from hpd.teachers.live import teacher_source_of
from hpd.teachers.routed import RoutedTeacher, split_by_teacher
from hpd.teachers.run_teacher import RunTeacher


class NamedTeachers:
    def __init__(self, teachers: dict[str, RunTeacher], route: Route, offload: bool = False):
        self.teachers, self.route, self.offload = teachers, route, offload
        self.names = route.names
        self.model = None  # no one teacher: the loop asks the hook for each batch
        self.tokenizer = None
        self._backend, self._cfg = None, None
        self.load_seconds: dict[str, float] = {}  # each teacher's load time, measured at its first load

    @classmethod
    def from_config(cls, cfg) -> NamedTeachers:
        names = tuple(cfg.teacher_names())
        route = Route(cfg.teacher_column, names, cfg.default_teacher)
        teachers = {n: RunTeacher(cfg.teachers.get(n, ""), cfg.teacher_caches.get(n, ""),
                                  keep=lambda row, k=k: route.of(row) == k) for k, n in enumerate(names)}
        return cls(teachers, route, cfg.teacher_offload)

    @property
    def name(self) -> str:
        return ", ".join(f"{n}={t.name}" for n, t in self.teachers.items())

    @property
    def scores_eval(self) -> bool:
        """Held-out rows are scored when every teacher has a model (a store alone cannot)."""
        return all(t.path for t in self.teachers.values())

    def models(self) -> dict[str, Any]:
        return {f"teacher {n}": t.model for n, t in self.teachers.items() if t.model is not None}

    def describe(self) -> str:
        modes = ", ".join(f"{n} {t.mode}" for n, t in self.teachers.items() if t.path)
        return f"; {len(self.teachers)} teachers routed by the rows' {self.route.column!r}" + (
            f"; teacher tokenizers: {modes}" if modes else "")

    def choose_mode(self, cfg, backend, tokenizer) -> None:
        for teacher in self.teachers.values():
            teacher.choose_mode(cfg, backend, tokenizer)

    def check_data(self, cfg, tokenizer, data, eval_kwargs: dict, say: Callable[[str], None]) -> None:
        for name, teacher in self.teachers.items():
            teacher.check_data(cfg, tokenizer, data, eval_kwargs, lambda m, n=name: say(f"{n}: {m}"))
        counts = [0] * len(self.names)
        for example in data.examples:
            counts[example.route] += 1
        say("teachers: " + ", ".join(f"{n} {c} rows" for n, c in zip(self.names, counts)))

    def load(self, backend, cfg, say: Callable[[str], None] = lambda message: None) -> None:
        """Every teacher, each timed; with --teacher-offload, each released again (a batch that
        needs it loads it), and the start says what a load costs."""
        self._backend, self._cfg = backend, cfg
        for name, teacher in self.teachers.items():
            self._load(name)
            if self.offload:
                teacher.release()
        gc.collect()
        if self.offload:
            loads = ", ".join(f"{n} {s:.1f} s" for n, s in self.load_seconds.items())
            say(f"teacher offload: only the teachers a batch needs stay loaded; a load costs {loads}")

    def _load(self, name: str) -> float:
        teacher = self.teachers[name]
        if teacher.model is not None or not teacher.path:
            return 0.0
        started = time.perf_counter()
        teacher.load(self._backend, self._cfg)
        seconds = time.perf_counter() - started
        self.load_seconds.setdefault(name, seconds)
        return seconds

    def _keep_only(self, needed: set[str]) -> float:
        """Unload the teachers a batch does not need, load those it does; seconds spent loading."""
        released = False
        for name, teacher in self.teachers.items():
            if name not in needed and teacher.model is not None:
                teacher.release()
                released = True
        if released:
            gc.collect()
        return sum(self._load(name) for name in sorted(needed))

    def vocab(self, backend, student) -> int:
        if self.offload:  # every teacher's size, loaded one at a time
            sizes = []
            for name, teacher in self.teachers.items():
                self._keep_only({name})
                sizes.append(teacher.vocab(backend, student))
            self._keep_only(set())
            return min(sizes)
        return min(t.vocab(backend, student) for t in self.teachers.values())

    def _sharded(self, backend) -> bool:
        """Teachers sharded across processes (--teacher-placement shard under torchrun)."""
        return backend.world_size > 1 and getattr(self._cfg, "teacher_placement", "replicate") == "shard"

    def hook(self) -> Callable:
        hooks = {name: teacher.hook() for name, teacher in self.teachers.items()}

        def teacher_source(loop, micro_batch: dict, arrays: dict, plan):
            if "route" not in micro_batch:
                raise ValueError("a batch without each row's teacher (route) in a run of named teachers")
            route = micro_batch["route"]
            present = split_by_teacher(route, len(self.names))
            seconds = self._keep_only({self.names[k] for k, _ in present}) if self.offload else 0.0
            parts, rows_of = [], dict(present)
            # sharded teachers gather their weights from every rank in each forward: every rank then
            # runs every teacher, in one order (on one row of its own, discarded, where it has none)
            order = range(len(self.names)) if self._sharded(loop.backend) else rows_of
            for k in order:
                sub = take_rows(micro_batch, rows_of.get(k, np.arange(1)))
                found = hooks[self.names[k]](loop, sub, loop.backend.to_arrays(sub), plan)
                if k in rows_of:
                    parts.append((k, teacher_source_of(found), rows_of[k]))
            owners = prompt_routes(micro_batch)  # each example's teacher (packed rows hold several)
            extra = {f"teacher/{self.names[k]}/rows": float(owners.count(k)) for k, _ in present}
            extra["rows"] = float(len(owners))
            if self.offload:
                extra["teacher/load_s"] = seconds
            groups = loop.backend.to_arrays({"route": route})["route"]
            return RoutedTeacher(parts, route, self.names, groups, extra)

        return teacher_source


__all__ = ["NamedTeachers"]
