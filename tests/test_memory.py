"""The memory plan: its parameter counts and weight bytes against real models, and
`hpd distill --dry-run`, which prints it and writes nothing. (Its activation and loss terms
are checked against measured peaks by benchmarks/memory_plan.py, not here.)"""

from __future__ import annotations

import json

import pytest

from hpd.models.memory import Setting, Shape, plan, trainable_count, weight_bytes


def shape_of(folder) -> Shape:
    return Shape.from_config(json.loads((folder / "config.json").read_text()))


@pytest.mark.parametrize("name", ["student", "teacher", "qwen_student", "qwen_teacher"])
def test_parameter_count_matches_the_model(assets, name):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets[name], dtype=torch.float32)
    shape = shape_of(assets[name])
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert weight_bytes(shape, 4) == 4 * shape.params()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weight_bytes_match_mlx(assets, bits):
    pytest.importorskip("mlx_lm")
    from hpd.backends.mlx import MlxBackend
    from hpd.backends.mlx.loading import param_bytes

    for name in ("teacher", "qwen_student"):
        model = MlxBackend().load_model(str(assets[name]), trainable=False, dtype="float32", quantize=bits)
        assert weight_bytes(shape_of(assets[name]), 4, bits) == param_bytes(model)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_lora_count_matches_the_backends(assets, targets):
    pytest.importorskip("mlx_lm")
    pytest.importorskip("peft")
    from hpd.backends.mlx import MlxBackend
    from hpd.backends.torch import TorchBackend

    from hpd.models.lora import LoraSpec

    shape = shape_of(assets["qwen_student"])
    want = trainable_count(shape, Setting(lora_rank=4, lora_targets=targets))
    for backend in (MlxBackend(), TorchBackend()):
        model = backend.load_model(str(assets["qwen_student"]), trainable=False, dtype="float32")
        model = backend.lora.apply(model, LoraSpec(rank=4, alpha=8.0, targets=targets), seed=0, base={}) or model
        assert backend.lora.counts(model) == want, backend.name


def test_plan_parts_add_up_and_respond_to_the_settings(assets):
    t = s = shape_of(assets["teacher"])  # 2 blocks: checkpointing has something to save
    base = Setting(length=256, batch=2)
    parts = dict(plan(t, s, base))
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    lora = dict(plan(t, s, Setting(length=256, batch=2, lora_rank=4)))
    assert lora["optimizer state (AdamW, float32)"] < 0.2 * parts["optimizer state (AdamW, float32)"]
    torch_parts = dict(plan(t, s, Setting(backend="torch", length=256, batch=2)))
    ckpt = dict(plan(t, s, Setting(backend="torch", length=256, batch=2, gradient_checkpointing=True)))
    assert ckpt["student activations (checkpointed)"] < torch_parts["student activations"]
    # mlx checkpoints through its two-pass step: the same saving
    mlx_ckpt = dict(plan(t, s, Setting(length=256, batch=2, gradient_checkpointing=True)))
    assert mlx_ckpt["student activations (checkpointed)"] < parts["student activations"]
    plain = dict(plan(t, s, Setting(length=256, batch=2, chunked=False)))
    assert "loss: logits buffers" in plain and "loss: chunk buffers" not in plain


def test_dry_run_prints_the_plan_and_writes_nothing(assets, tmp_path):
    from click.testing import CliRunner
    from hpd.cli.main import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "distill", "--teacher", str(assets["teacher"]), "--student", str(assets["student"]),
        "--data", str(assets["data"]), "--out", str(out), "--lora-rank", "4", "--backend", "mlx", "--dry-run"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    shape = shape_of(assets["student"])
    trainable, total = trainable_count(shape, Setting(lora_rank=4))
    assert f"trainable parameters: {trainable:,} of {total:,}" in result.output
    for part in ("teacher weights", "student weights", "gradients", "optimizer state", "student activations",
                 "loss: chunk buffers", "total"):
        assert part in result.output
    assert "memory plan (mlx" in result.output and "memory plan (torch" in result.output
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_plan_sizes_chunks_as_a_default_run_does():
    """The plan's chunk buffers follow the run's own default budget (a plan that assumed a
    larger budget counted 4x the chunk positions at a 152k vocabulary)."""
    from dataclasses import fields

    from hpd.models.memory import chunk_positions
    from hpd.objectives.chunked import resolve_chunk_budget, resolve_chunk_size
    from hpd.train.config import DistillConfig

    default = resolve_chunk_budget(next(f.default for f in fields(DistillConfig) if f.name == "chunk_budget_mb"),
                                   accelerator=False)
    assert Setting().chunk_budget_mb == default == 64
    for vocab in (320, 32000, 151936):
        assert chunk_positions(Setting(), vocab) == resolve_chunk_size("auto", vocab, budget_mb=default)


def test_chunk_budget_default_is_larger_with_torch_on_cuda():
    """--chunk-budget-mb 0 (the default) resolves to 64 MiB, and to 1 GiB where the student
    runs on CUDA (the loop and the plan agree); a given budget is kept everywhere."""
    from types import SimpleNamespace

    from hpd.models.memory import setting_of
    from hpd.objectives.chunked import resolve_chunk_budget
    from hpd.train.config import DistillConfig
    from hpd.train.loop import Loop

    assert resolve_chunk_budget(0, accelerator=False) == 64
    assert resolve_chunk_budget(0, accelerator=True) == 1024
    assert resolve_chunk_budget(256, accelerator=True) == 256
    for device, given, want in (("cuda", 0, 1024), ("cpu", 0, 64), ("cuda", 96, 96)):
        cfg = DistillConfig.from_dict({"chunk_budget_mb": given, "device": device})
        loop = SimpleNamespace(config=cfg, backend=SimpleNamespace(device_type=device))
        assert Loop.chunk_budget_mb.fget(loop) == want
        assert setting_of(cfg, "torch").chunk_budget_mb == want
    assert setting_of(DistillConfig.from_dict({"device": "cuda"}), "mlx").chunk_budget_mb == 64
    with pytest.raises(ValueError):
        DistillConfig.from_dict({"chunk_budget_mb": -1}).validate(require_paths=False)


def test_the_plan_counts_a_vllm_rollout_engine(assets, tmp_path):
    """One micro-batch of max_length sequences of KV cache (whole blocks of 128 tokens on the
    CPU, whole MiB), the engine's weights and loads, and vLLM's runtime; mlx keeps mlx-lm."""
    from hpd.models.memory import ENGINE_RUNTIME, dry_run, setting_of
    from hpd.train.config import DistillConfig

    base = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
                out=str(tmp_path / "o"), batch_size=40, max_length=200, device="cpu", rollout_engine="vllm")
    shape = shape_of(assets["student"])
    assert 2 * shape.layers * shape.kv_heads * shape.head_dim * 4 == 128  # bytes a token, float32
    cfg = DistillConfig.from_dict(base)
    s = setting_of(cfg, "torch")
    assert s.engine_kv == 2 * 2**20  # 40 x 256 x 128 B = 1.25 MiB (40 x 200 tokens would be 0.98)
    parts = dict(plan(shape_of(assets["teacher"]), shape, s))
    assert parts["rollout engine: KV cache"] == s.engine_kv
    assert parts["rollout engine: vLLM runtime"] == ENGINE_RUNTIME
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert setting_of(DistillConfig.from_dict({**base, "rollout_kv_cache_mb": 64}), "torch").engine_kv == 64 * 2**20
    assert setting_of(cfg, "mlx").engine_kv == 0
    text = dry_run(cfg)
    assert "rollout engine: KV cache" in text.split("memory plan (mlx")[0]
    assert "rollout engine" not in text.split("memory plan (mlx")[1]
