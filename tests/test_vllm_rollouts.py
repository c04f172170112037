"""Student rollouts on a vLLM engine in the training process (--rollout-engine vllm), against a
real engine on the shipped tiny student (the session's `vllm_student`: float32, a KV cache
smaller than a micro-batch needs, so vLLM preempts and recomputes along the way).

- after every load of the student's weights, greedy vLLM rollouts equal greedy transformers
  rollouts token for token, over 3 optimizer steps of a fully on-policy run, for a whole
  student and a LoRA one (merged weights), and the two runs train the same weights;
- the weights are loaded once per optimizer step, and only then;
- sampled rollouts follow (seed, step, row): a resumed run repeats an uninterrupted one, and a
  row draws the same continuation whichever micro-batch it is in;
- what is refused before training: a prompt as long as the engine's max_model_len (naming its
  row), a KV cache smaller than one sequence.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from vllm_runs import Recorder, config, max_diff, weights, write_data

import hpd
from hpd.train import checkpoint as ckpt
from hpd.train.rollout import BackendRollouts, Rollouts, Sampling, prompts_of
from hpd.train.rollout_vllm import VllmRollouts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def _stale_probe(engine: VllmRollouts, seen: list):
    """Before a rollout that loads new weights: the engine's greedy continuations as they were."""

    def before(loop, batch):
        if engine.loaded_step is not None and engine.loaded_step != loop.state.step:
            prompts = prompts_of(batch)
            seen.append((loop.state.step, np.asarray(batch["rows"]).tolist(),
                         engine.engine.generate(prompts, [32] * len(prompts), seeds=None)))

    return before


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_greedy_rollouts_equal_transformers_after_every_load(vllm_student, data, tmp_path, lora):
    greedy = Sampling(max_new_tokens=32, greedy=True)
    extra = dict(grad_accum=2, lora_rank=lora, lr=2e-2 if lora else 5e-3)
    hf = Recorder(Rollouts(greedy, BackendRollouts()))
    hpd.distill(config(tmp_path / "hf", data, **extra), rollout=hf)
    engine, stale = VllmRollouts(vllm_student, owned=False), []
    vllm = Recorder(Rollouts(greedy, engine), before=_stale_probe(engine, stale))
    preempted = _preemptions(vllm_student)
    hpd.distill(config(tmp_path / "vllm", data, **extra), rollout=vllm)

    assert [c[:2] for c in hf.calls] == [c[:2] for c in vllm.calls]
    assert [s for s, _, _ in vllm.calls] == [0, 0, 1, 1, 2, 2]  # 3 steps x 2 micro-batches of 16 rows
    for (step, rows, want), (_, _, got) in zip(hf.calls, vllm.calls):
        assert got == want, f"step {step}: vLLM's greedy rollouts differ from transformers'"
    assert engine.loads == 3  # once per optimizer step, not per micro-batch
    # the loads mattered: before each, the engine still continued some rows as the old weights did
    assert len(stale) == 2
    assert any(old != hf.by_row(step)[r] for step, rows, olds in stale for r, old in zip(rows, olds))
    assert _preemptions(vllm_student) > preempted  # the small KV cache was outgrown, and nothing changed
    if lora:
        from hpd.models.lora import read_meta

        assert read_meta(tmp_path / "vllm" / "checkpoints" / "step-3") is not None
    assert max_diff(weights(tmp_path / "hf"), weights(tmp_path / "vllm")) == 0.0


def _preemptions(student_engine) -> int:
    metrics = {m.name: getattr(m, "value", None) for m in student_engine.engine.llm.get_metrics()}
    return int(metrics["vllm:num_preemptions"])


def test_resume_repeats_the_sampled_rollouts(vllm_student, data, tmp_path):
    sampled = Sampling(max_new_tokens=32, temperature=1.0)
    full = Recorder(Rollouts(sampled, VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(tmp_path / "full", data, steps=4, save_every=2), rollout=full)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    assert ckpt.latest_checkpoint(part).name == "step-2"
    resumed = Recorder(Rollouts(sampled, VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(part, data, steps=4, save_every=2, resume=True), rollout=resumed)

    assert [s for s, _, _ in resumed.calls] == [2, 3]
    assert resumed.calls == full.calls[2:]
    assert max_diff(weights(tmp_path / "full"), weights(part)) == 0.0
    # they are samples: the greedy continuations of the same rows differ somewhere
    step, rows, gens = full.calls[0]
    greedy = VllmRollouts(vllm_student, owned=False)
    batch_prompts = _prompts(data, rows)
    assert greedy.engine.generate(batch_prompts, [32] * len(rows), seeds=None) != gens


def _prompts(data, rows):
    from transformers import AutoTokenizer

    from hpd.data.batches import load_dataset
    from hpd.models.loading import asset_path

    examples = load_dataset(data, AutoTokenizer.from_pretrained(asset_path("hpd:tiny/student")), 128).examples
    return [examples[r].input_ids[:examples[r].prompt_len] for r in rows]


def test_a_row_draws_the_same_rollout_in_any_micro_batch(vllm_student, data, tmp_path):
    """16 rows as one micro-batch or as 4 of 4: each row's seed is keyed by (seed, step, row)."""
    sampled = Sampling(max_new_tokens=32, temperature=1.0)
    one = Recorder(Rollouts(sampled, VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(tmp_path / "one", data, steps=1), rollout=one)
    four = Recorder(Rollouts(sampled, VllmRollouts(vllm_student, owned=False)))
    hpd.distill(config(tmp_path / "four", data, steps=1, batch_size=4, grad_accum=4), rollout=four)
    assert len(one.calls) == 1 and len(four.calls) == 4
    assert one.by_row(0) == four.by_row(0)
    # each is the draw of its row's own seed; the run's seed 1 would have drawn others
    from hpd.objectives.uniforms import keyed_seeds

    (step, rows, gens), = one.calls
    prompts = _prompts(data, rows)
    for seed, same in ((0, True), (1, False)):
        again = vllm_student.generate(prompts, [32] * len(rows), seeds=keyed_seeds(seed, step, rows).tolist())
        assert (again == gens) is same


def test_a_prompt_as_long_as_max_model_len_is_refused_naming_its_row(data, tmp_path):
    lines = data.read_text().splitlines()
    long_row = data.parent / "long.jsonl"
    long_row.write_text("\n".join(lines[:40]) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"long\.jsonl:\d+ \(\d+ tokens\).*--rollout-max-model-len"):
        hpd.distill(config(out, long_row, rollout_max_model_len=28))
    assert not out.exists()  # refused before anything was written


def test_a_kv_cache_smaller_than_one_sequence_is_refused_before_the_engine_starts(data, tmp_path):
    out = tmp_path / "run"
    # the tiny student keeps 1 KiB per token: one sequence of 2048 tokens needs 2 MiB
    with pytest.raises(ValueError, match=r"needs at least 2\.00 MiB to hold one sequence of 2048 tokens"):
        hpd.distill(config(out, data, max_length=2048, rollout_kv_cache_mb=1))
    assert not out.exists()
