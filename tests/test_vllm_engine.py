"""The in-process vLLM engine: it leaves the training process as it found it, and its greedy
generations equal transformers' on the shipped tiny teacher (float32)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.vllm


def _prompts(n: int):
    from transformers import AutoTokenizer

    from hpd.data.examples import prompt_ids
    from hpd.models.loading import asset_path

    tok = AutoTokenizer.from_pretrained(asset_path("hpd:tiny/teacher"))
    rows = [json.loads(line) for line in open(asset_path("hpd:tiny/held.jsonl"))][:n]
    return [list(prompt_ids(row, tok)[0]) for row in rows], tok


def test_the_engine_restores_what_vllm_changes_in_the_process():
    pytest.importorskip("vllm")
    import torch

    from hpd.engines import vllm as engines
    from hpd.models.loading import asset_path

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    threads, preload = torch.get_num_threads(), os.environ.get("LD_PRELOAD")
    engine = engines.start(asset_path("hpd:tiny/student"), engines.EngineOptions(dtype="float32", kv_cache_mb=16,
                                                                                 max_model_len=64))
    try:
        assert torch.equal(torch.rand(3), want)  # the training process's RNG stream goes on as it was
        assert torch.get_num_threads() == threads and os.environ.get("LD_PRELOAD") == preload
        torch.set_num_threads(1)  # still the real function, not vLLM's no-op
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        engine.shutdown()


def test_greedy_generations_equal_transformers(vllm_teacher):
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from hpd.models.loading import asset_path

    prompts, tok = _prompts(16)
    model = AutoModelForCausalLM.from_pretrained(asset_path("hpd:tiny/teacher"), dtype=torch.float32).eval()
    got = vllm_teacher.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)[0, len(prompt):].tolist()
        assert list(out.outputs[0].token_ids) == ref
