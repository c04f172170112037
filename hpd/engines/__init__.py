"""Heavy inference engines (vLLM) that the teacher's inference and the student's rollouts can run
on; each is an optional extra, imported only when used. Imports objectives, files, data and models."""
