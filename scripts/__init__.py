"""How the shipped models in hpd/assets were made: `python -m scripts.make_tiny_models`,
`scripts.make_sums_models` and `scripts.make_sums4_models`, from the repository root; each is
one task (scripts.model_tasks) run by one maker (scripts.model_maker)."""
