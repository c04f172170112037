"""The live teacher: the teacher model's forward on the batch, as a TeacherSource."""

from __future__ import annotations

from hpd.models.backend import Outputs
from hpd.objectives.teacher import LiveTeacher, LogitsTeacher


def teacher_source_of(teacher):
    """A TeacherSource from the teacher model's Outputs (hidden states and head, or
    logits), or the source itself."""
    if isinstance(teacher, Outputs):
        return LiveTeacher(teacher.hidden, teacher.head) if teacher.logits is None else LogitsTeacher(teacher.logits)
    return teacher


def live_teacher(loop, micro_batch: dict, arrays: dict, plan):
    """The default `teacher_source` of a Loop: the teacher model's forward on the batch
    (plan None: an evaluation batch, scored from logits)."""
    return loop.backend.forward(loop.teacher, arrays, hidden=loop.chunked and plan is not None)


def live_source(model_of):
    """A `teacher_source` hook like `live_teacher`, for the model `model_of()` returns (one
    of several teachers, loaded or swapped in by the caller)."""

    def teacher_source(loop, micro_batch: dict, arrays: dict, plan):
        return loop.backend.forward(model_of(), arrays, hidden=loop.chunked and plan is not None)

    return teacher_source
