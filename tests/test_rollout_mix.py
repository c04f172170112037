"""`rollout_mix: rows`: each step replaces a share lambda of its rows by student rollouts and keeps
the data in the rest, so HPD's data token is in every step (hpd.train.schedule, hpd.train.rollout)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hpd.data.batches import collate
from hpd.data.examples import IGNORE_INDEX, Example
from hpd.data.packing import collate_packed
from hpd.train.rollout import Sampling, data_examples, rollout_batch
from hpd.train.schedule import Schedule
from hpd.train.schedule_config import ScheduleConfig


def make(total_steps=100, seed=0, **fields) -> Schedule:
    return Schedule(ScheduleConfig.from_dict(fields), method="hpd", method_params={}, total_steps=total_steps,
                    seed=seed)


def test_rows_mix_puts_rollouts_in_every_step_at_a_share_of_its_rows():
    s = make(1000, seed=4, rollout_mix="rows", lambda_start=0.3)
    plans = [s.plan(t) for t in range(1000)]
    assert all(p.on_policy and p.rollout_share == 0.3 for p in plans)
    assert plans[5].as_metrics()["schedule/rollout_share"] == 0.3
    flags = [f for t in range(200) for f in s.rollout_rows(t, range(32))]
    assert abs(sum(flags) / len(flags) - 0.3) < 0.03
    one = s.rollout_rows(7, range(32))
    assert 0 < sum(one) < 32  # a step mixes rollouts with data rows
    # a row's coin depends on (seed, step, row) only: any split of a batch picks the same rows
    assert s.rollout_rows(7, [3, 9, 20]) == [one[3], one[9], one[20]]
    assert s.rollout_rows(8, range(32)) != one and make(1000, seed=5, rollout_mix="rows",
                                                       lambda_start=0.3).rollout_rows(7, range(32)) != one
    # a row replaced at a share stays replaced at a larger one
    high = make(1000, seed=4, rollout_mix="rows", lambda_start=0.6).rollout_rows(7, range(32))
    assert all(h for lo, h in zip(one, high) if lo)


def test_rows_mix_follows_the_ramp_and_steps_mix_replaces_whole_steps():
    s = make(100, rollout_mix="rows", lambda_schedule="linear", lambda_start=0.0, lambda_end=0.5, ramp_end=0.5)
    assert not s.plan(0).on_policy and s.rollout_rows(0, range(8)) == [False] * 8
    assert s.plan(25).rollout_share == pytest.approx(0.25) and s.plan(80).rollout_share == 0.5
    steps = make(100, seed=1, lambda_start=0.5)
    for t in range(20):
        flags = steps.rollout_rows(t, range(8))
        assert flags == [steps.plan(t).on_policy] * 8 and steps.plan(t).rollout_share is None
    assert "schedule/rollout_share" not in steps.plan(0).as_metrics()


def test_rollout_mix_is_checked():
    with pytest.raises(ValueError, match="rollout_mix='both': allowed steps, rows"):
        ScheduleConfig.from_dict({"rollout_mix": "both"})


EXAMPLES = [Example([1, 5, 6, 7, 8, 2], [False, False, False, True, True, True], 3),
            Example([1, 9, 4, 2], [False, False, True, True], 2),
            Example([1, 3, 3, 3, 5, 6, 2], [False, False, False, False, True, True, True], 4)]


@pytest.mark.parametrize("packed", [False, True])
def test_a_batch_gives_back_the_examples_it_was_collated_from(packed):
    batch = collate_packed(EXAMPLES, 0, rows=[10, 11, 12]) if packed else collate(EXAMPLES, 0)
    assert data_examples(batch) == EXAMPLES


class FakeBackend:
    """generate: each prompt continued by [40 + its length, eos]."""

    def __init__(self):
        self.asked = []

    def generate(self, model, tokenizer, prompts, **kw):
        self.asked.append([list(p) for p in prompts])
        return [[40 + len(p), 2] for p in prompts]


@pytest.mark.parametrize("packed", [False, True])
def test_rollouts_replace_only_the_flagged_rows_and_the_others_keep_their_data(packed):
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    batch = collate_packed(EXAMPLES, 0, rows=[10, 11, 12]) if packed else collate(EXAMPLES, 0)
    if not packed:
        batch["rows"] = np.array([10, 11, 12])
    backend = FakeBackend()
    out = rollout_batch(backend, None, tok, batch, Sampling(max_new_tokens=4), 64, replace=[True, False, True])
    assert backend.asked == [[[1, 5, 6], [1, 3, 3, 3]]]  # only the replaced rows' prompts
    got = data_examples(out)
    assert got[1] == EXAMPLES[1]  # kept: its completion and targets
    assert got[0] == Example([1, 5, 6, 43, 2], [False, False, False, True, True], 3)
    assert got[2] == Example([1, 3, 3, 3, 44, 2], [False] * 4 + [True, True], 4)
    assert int(out["generated_tokens"]) == 4 and int(out["generated_rows"]) == 2
    assert list(out["rows"]) == [10, 11, 12]
    targets = out["targets"][out["targets"] != IGNORE_INDEX]
    assert sorted(targets.tolist()) == sorted([43, 2, 4, 2, 44, 2])
    # nothing flagged: no generation, the data unchanged
    none = rollout_batch(backend, None, tok, batch, Sampling(max_new_tokens=4), 64, replace=[False] * 3)
    assert data_examples(none) == EXAMPLES and int(none["generated_tokens"]) == 0 and len(backend.asked) == 1


def test_distill_help_says_what_rows_mix_does():
    from click.testing import CliRunner

    from hpd.cli.main import cli

    text = " ".join(CliRunner().invoke(cli, ["distill", "--help"]).output.split())
    assert "rollout_mix: rows" in text and "HPD's data token stays beside the student's sample" in text
