"""The run's teachers: one (`hpd.teachers.run_teacher`) or several named ones (`hpd.teachers.named`).

Either answers the run alike: its name and start line, the checks against the data before
any model loads, loading, the shared vocabulary, and the loop's `teacher_source` hook.
"""

from __future__ import annotations

from hpd.teachers.named import NamedTeachers
from hpd.teachers.run_teacher import RunTeacher


def prepare(cfg, backend, tokenizer):
    """The run's teacher (`RunTeacher`), or its named teachers (`hpd.teachers.named`), as far
    as their tokenizers: every mode is chosen before the data loads."""
    if cfg.teacher_names():
        teachers = NamedTeachers.from_config(cfg)
    else:
        teachers = RunTeacher(cfg.teacher, cfg.teacher_cache)
    teachers.choose_mode(cfg, backend, tokenizer)
    return teachers


__all__ = ["prepare"]
