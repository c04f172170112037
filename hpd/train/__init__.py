"""Training: the config (`config`, `advice`), the schedule (`schedule`, `phases`), the loop
(`loop`), rollouts (`rollout`), the run's set-up and export (`run`, `export`), checkpoints
and resume (`checkpoint`, `resume`), signals and the process (`interrupt`, `allocator`).
The top of the core: it may import every other package; none of them imports it."""
