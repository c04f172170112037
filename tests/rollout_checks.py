"""Checks on rollout batches shared by the torch and mlx rollout tests."""

from __future__ import annotations

import numpy as np

from hpd.data.examples import IGNORE_INDEX


def assert_rollout_targets(batch: dict, out: dict, eos: int, max_new_tokens: int) -> None:
    """Prompts kept; targets are exactly the generated tokens, nothing after EOS."""
    assert int(out["generated_tokens"]) > 0
    for i in range(len(batch["input_ids"])):
        n_prompt = int(batch["prompt_lens"][i])
        np.testing.assert_array_equal(out["input_ids"][i, :n_prompt], batch["input_ids"][i, :n_prompt])
        length = int(out["attention_mask"][i].sum())
        gen = out["input_ids"][i, n_prompt:length].tolist()
        assert 1 <= len(gen) <= max_new_tokens
        if eos in gen:  # nothing after EOS
            assert gen.index(eos) == len(gen) - 1
        targets = out["targets"][i]
        # prompt tokens carry no loss; logits[t] scores input_ids[t + 1] for every generated token
        assert (targets[: n_prompt - 1] == IGNORE_INDEX).all()
        assert targets[n_prompt - 1: length - 1].tolist() == gen
        assert (targets[length - 1:] == IGNORE_INDEX).all()


PROMPT_ROWS = [{"prompt": "the cat sat"}, {"prompt": "one two"},
               {"messages": [{"role": "user", "content": "how many apples"}]}]


def write_prompts(folder):
    """A prompts file for `hpd generate`: two prompt rows and one chat row."""
    import json
    from pathlib import Path

    path = Path(folder) / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    return path
