"""Where the teacher's log-probs come from, behind `hpd.objectives.teacher.TeacherSource`:
the live teacher (`live`), the offline store's format (`store`), its reader (`stored`) and
its writer (`cache`, `hpd cache-teacher`). Imports objectives, files, data and models."""
