"""Every model family on both backends: tiny random models built here, saved as
transformers 5 saves them (nested rope_parameters only, no top-level rope_theta).

Per family and backend: 2 steps of fkl and of hpd; the chunked loss equals the plain one
(loss and gradient norm, 1e-5 relative or 1e-8 absolute for hpd's near-zero
surrogate values; seen ~1e-7 relative); the export loads in transformers and
in mlx-lm (without hpd's translation) with logits equal to the trained student's (1e-4
absolute; seen ~5e-6). Per family: the first loss on MLX equals torch's on the same folders
(1e-5 relative). rope_theta is 31250 everywhere, a value no library defaults to, so a
dropped key shows. Where mlx-lm approximates a family (GPT-NeoX's gelu, Gemma3's bfloat16
embedding scale) the models here avoid the difference (tanh gelu, hidden 64) and a separate
test checks the warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hpd.data.batches import collate, load_dataset
from hpd.data.examples import pad_id_of
from hpd.models import families
from hpd.train.config import DistillConfig
from hpd.train.loop import objective_loss_fn, target_count

THETA = 31250.0
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": THETA}
# name -> (model_type, config overrides); mlx-lm's gemma2 and cohere always tie their head
FAMILIES = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": LLAMA3}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8, "final_logit_softcapping": 2.0,
                          "tie_word_embeddings": True}),
    "gemma3": ("gemma3_text", {"head_dim": 8, "query_pre_attn_scalar": 8, "num_hidden_layers": 6,
                               "hidden_size": 64, "intermediate_size": 64}),
    "phi3": ("phi3", {}),
    "phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5}),
    "mistral": ("mistral", {}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                            "attention_multiplier": 0.3}),
    "cohere": ("cohere", {"logit_scale": 0.25, "tie_word_embeddings": True}),
    "gpt-neox": ("gpt_neox", {"intermediate_size": 128, "hidden_act": "gelu_pytorch_tanh",
                              "rotary_emb_base": THETA}),
}
SCALED = {"gemma2": (1.0, 2.0), "granite": (0.25, 0.0), "cohere": (0.25, 0.0)}  # (scale, softcap)
LR = 1e-2

_built: dict[str, dict[str, Path]] = {}


def build(root: Path, tokenizer_dir: Path, model_type: str, overrides: dict, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    if "rope_parameters" not in kw:
        kw["rope_theta"] = THETA
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    with torch.no_grad():  # larger random weights so teacher and student disagree clearly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    config = json.loads((root / "config.json").read_text())
    # as transformers 5 writes it: the rope settings only inside rope_parameters
    assert "rope_parameters" in config
    config = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling", "rotary_emb_base")}
    (root / "config.json").write_text(json.dumps(config))
    return root


def models(assets, name: str) -> dict[str, Path]:
    if name not in _built:
        model_type, overrides = FAMILIES[name]
        root = assets["root"] / "families" / name
        _built[name] = {side: build(root / side, assets["tokenizer"], model_type, overrides, seed)
                        for side, seed in (("teacher", 1), ("student", 2))}
    return _built[name]


def get_backend(name: str):
    if name == "mlx":
        pytest.importorskip("mlx.core", reason="the mlx backend needs mlx")
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm")
        from hpd.backends.mlx import MlxBackend

        return MlxBackend()
    pytest.importorskip("torch")
    from hpd.backends.torch import TorchBackend

    return TorchBackend()


def one_batch(backend, assets, folder: Path):
    tok = backend.load_tokenizer(str(folder))
    data = load_dataset(assets["data"], tok, 24)
    batch = collate(data.examples[:4], pad_id_of(tok))
    samples = np.random.default_rng(0).integers(0, len(tok), size=batch["targets"].shape)
    return tok, batch, samples


def step(backend, teacher, student, batch, samples, method: str, hidden: bool, optimizer, lr: float):
    """One optimizer step as the loop takes it; (loss, pre-clip gradient norm)."""
    arrays = backend.to_arrays(batch)
    sampled = backend.to_arrays({"s": samples})["s"]
    tokens = float(target_count(batch["targets"], backend.vocab_size(student)))
    objectives = [SimpleNamespace(method=method, weight=1.0, params={})]
    teacher_out = backend.forward(teacher, arrays, hidden=hidden)
    loss_fn = objective_loss_fn(objectives, teacher_out, arrays["targets"], sampled=sampled, num_tokens=tokens,
                                temperature=1.0, chunk_size=16)
    value, _ = backend.forward_backward(student, arrays, loss_fn, hidden=hidden)
    return value, backend.optimizer_step(student, optimizer, lr, 0.0)


def logits_of(backend, model, ids) -> np.ndarray:
    out = backend.forward(model, backend.to_arrays({"input_ids": ids, "attention_mask": np.ones_like(ids)}))
    return np.array(out.logits, dtype=np.float32) if backend.name == "mlx" else out.logits.float().numpy()


def transformers_logits(folder: Path, ids) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def mlx_lm_logits(folder: Path, ids) -> np.ndarray:
    """mlx_lm.load on the exported folder, without hpd's config translation."""
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return np.array(model(mx.array(ids)), dtype=np.float32)


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(assets, tmp_path, name, backend_name):
    backend = get_backend(backend_name)
    paths = models(assets, name)
    backend.seed(0)
    _, batch, samples = one_batch(backend, assets, paths["student"])
    teacher = backend.load_model(str(paths["teacher"]), trainable=False, dtype="float32")
    student = backend.load_model(str(paths["student"]), trainable=True, dtype="float32")
    optimizer = backend.make_optimizer(student, DistillConfig(lr=LR))
    from hpd.train.run import choose_loss_path

    chunked, line = choose_loss_path("auto", backend, student=student, teacher=teacher)
    assert chunked, f"{name}: {line}"
    head = backend.head_of(student)
    assert (head.scale, head.softcap) == SCALED.get(name, (1.0, 0.0))

    for method in ("fkl", "hpd"):
        # the same loss and gradient both ways: lr 0 leaves the weights where they are
        plain = step(backend, teacher, student, batch, samples, method, False, optimizer, 0.0)
        fused = step(backend, teacher, student, batch, samples, method, True, optimizer, 0.0)
        assert fused == pytest.approx(plain, rel=1e-5, abs=1e-8), f"{name} {method}: chunked {fused} != plain {plain}"
        losses = [step(backend, teacher, student, batch, samples, method, True, optimizer, LR)[0]
                  for _ in range(2)]
        assert all(math.isfinite(v) for v in losses), f"{name} {method}: {losses}"
        if method == "fkl":  # a divergence; hpd's value is a surrogate that need not fall every step
            assert losses[1] < losses[0], f"{name} fkl: {losses}"

    ids = np.array([[1, 5, 9, 30, 70, 2, 100, 44, 17, 3, 200, 250, 11, 12, 13, 14]], dtype=np.int64)
    expected = logits_of(backend, student, ids)
    out = tmp_path / "export"
    backend.save_model(student, backend.load_tokenizer(str(paths["student"])), out)
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" in config, "the nested form transformers 5 reads"
    for loader in (transformers_logits, mlx_lm_logits):
        np.testing.assert_allclose(loader(out, ids), expected, rtol=0, atol=1e-4, err_msg=f"{name}: {loader.__name__}")


@pytest.mark.parametrize("name", sorted(SCALED))
def test_quantized_scaled_teacher_chunked_equals_plain(assets, name):
    """A scaled or soft-capped head that is also quantized (mlx affine, 8 bits) and tied."""
    backend = get_backend("mlx")
    paths = models(assets, name)
    _, batch, samples = one_batch(backend, assets, paths["student"])
    teacher = backend.load_model(str(paths["teacher"]), trainable=False, dtype="float32", quantize=8)
    student = backend.load_model(str(paths["student"]), trainable=True, dtype="float32")
    head = backend.head_of(teacher)
    assert head.quantized and (head.scale, head.softcap) == SCALED[name]
    optimizer = backend.make_optimizer(student, DistillConfig(lr=LR))
    for method in ("fkl", "hpd"):
        plain = step(backend, teacher, student, batch, samples, method, False, optimizer, 0.0)
        fused = step(backend, teacher, student, batch, samples, method, True, optimizer, 0.0)
        assert fused == pytest.approx(plain, rel=1e-5, abs=1e-8), f"{name} {method}: chunked {fused} != plain {plain}"


def test_chunked_on_refuses_an_unknown_scaling(assets, tmp_path):
    """A scaling key in a family without a rule: --chunked on stops, auto takes the plain path."""
    from hpd.train.run import choose_loss_path

    backend = get_backend("torch")
    folder = tmp_path / "odd"
    folder.mkdir()
    for p in models(assets, "llama")["student"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lm_head_multiplier": 0.5}))
    model = backend.load_model(str(folder), trainable=True, dtype="float32")
    assert "lm_head_multiplier=0.5" in backend.chunked_blocker(model)
    with pytest.raises(ValueError, match="--chunked on: .*lm_head_multiplier=0.5"):
        choose_loss_path("on", backend, student=model, teacher=model)
    assert choose_loss_path("auto", backend, student=model, teacher=model)[0] is False


@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers5_folder_same_first_loss(assets, name):
    """A folder as transformers 5 writes it trains on MLX from the same first loss as on torch."""
    paths = models(assets, name)
    first = {}
    for backend_name in ("torch", "mlx"):
        backend = get_backend(backend_name)
        backend.seed(0)
        _, batch, samples = one_batch(backend, assets, paths["student"])
        teacher = backend.load_model(str(paths["teacher"]), trainable=False, dtype="float32")
        student = backend.load_model(str(paths["student"]), trainable=True, dtype="float32")
        optimizer = backend.make_optimizer(student, DistillConfig(lr=LR))
        first[backend_name] = step(backend, teacher, student, batch, samples, "fkl", False, optimizer, LR)
    assert first["mlx"] == pytest.approx(first["torch"], rel=1e-5), f"{name}: {first}"


# ---------------------------------------------------------------- the translation itself
def test_nested_config_reaches_mlx_keys():
    gemma3 = {"model_type": "gemma3_text", "num_hidden_layers": 6,
              "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert families.mlx_keys(gemma3) == {
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
        "rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    neox = {"model_type": "gpt_neox", "rope_parameters": {"rope_type": "default", "rope_theta": 5e4,
                                                          "partial_rotary_factor": 0.5}}
    assert families.mlx_keys(neox) == {"rotary_emb_base": 5e4, "rotary_pct": 0.5}
    llama = families.mlx_keys({"model_type": "llama", "rope_parameters": LLAMA3})
    assert llama["rope_theta"] == THETA and llama["rope_scaling"]["type"] == "llama3"
    # no rope settings at all: transformers' own default for the family, not mlx-lm's (1e6 for qwen2)
    assert families.mlx_keys({"model_type": "qwen2"})["rope_theta"] == 10000.0


def test_legacy_config_gains_the_nested_form():
    """A transformers 4 config (top-level keys only) exports with rope_parameters too."""
    legacy = {"model_type": "gemma3_text", "rope_theta": 1e6, "rope_local_base_freq": 1e4,
              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    both = families.both_forms(legacy)
    assert both["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert both["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert both["rope_theta"] == 1e6 and both["rope_local_base_freq"] == 1e4
    neox = families.both_forms({"model_type": "gpt_neox", "rotary_emb_base": 5e4, "rotary_pct": 0.5})
    assert neox["rope_parameters"]["partial_rotary_factor"] == 0.5 and neox["rotary_emb_base"] == 5e4


def test_export_config_reads_the_same_in_transformers():
    """Both forms in one config.json give transformers the rope parameters of the nested form."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = {"model_type": "llama", "rope_parameters": dict(LLAMA3)}
    both = families.both_forms(config)
    assert both["rope_scaling"] is not None  # what mlx-lm and transformers 4 read
    read = CONFIG_MAPPING["llama"].from_dict(json.loads(json.dumps(both))).rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == LLAMA3


@pytest.mark.parametrize("config,words", [
    ({"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["sliding_attention"] * 2},
     "needs at least sliding_window_pattern=6 layers"),
    ({"model_type": "gemma2", "tie_word_embeddings": False}, "tied to the input embedding"),
    ({"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64}, "4 x hidden_size"),
    ({"model_type": "cohere", "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "does not implement rope_type='linear'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"model_type": "gemma3_text", "num_hidden_layers": 6, "final_logit_softcapping": 30.0},
     "ignores final_logit_softcapping=30.0"),
])
def test_mlx_limits_fail_clearly(config, words):
    with pytest.raises(families.FamilyError, match="use --backend torch") as error:
        keys = families.mlx_keys(config)
        families.check_mlx_layers({**config, **keys})
    assert words in str(error.value)


def test_mlx_load_names_the_limit(assets):
    """mlx-lm's own IndexError for a 2-layer Gemma3 becomes hpd's message, before any weights load."""
    backend = get_backend("mlx")
    folder = build(assets["root"] / "families" / "gemma3-2-layers", assets["tokenizer"], "gemma3_text",
                   {"head_dim": 8, "query_pre_attn_scalar": 8, "num_hidden_layers": 2}, 0)
    with pytest.raises(families.FamilyError, match=r"gemma3_text: mlx-lm needs at least .* \(this model has 2\)"):
        backend.load_model(str(folder), trainable=True, dtype="float32")


def test_mlx_approximation_warns():
    assert families.mlx_differences({"model_type": "gpt_neox", "hidden_act": "gelu"}) == [
        "gpt_neox: mlx-lm's gpt_neox uses the tanh approximation of gelu where this model uses "
        "hidden_act='gelu' (logits differ by ~1e-3)"]
    assert families.mlx_differences({"model_type": "gpt_neox", "hidden_act": "gelu_new"}) == []
    assert families.mlx_differences({"model_type": "gemma3_text", "hidden_size": 64}) == []
    assert len(families.mlx_differences({"model_type": "gemma3_text", "hidden_size": 1152})) == 1


def test_head_scaling_per_family():
    assert families.head_scaling({"model_type": "granite", "logits_scaling": 4.0}) == (0.25, 0.0)
    assert families.head_scaling({"model_type": "cohere", "logit_scale": 0.0625}) == (0.0625, 0.0)
    assert families.head_scaling({"model_type": "gemma2", "final_logit_softcapping": 30.0}) == (1.0, 30.0)
    assert families.head_scaling({"model_type": "gemma3_text", "final_logit_softcapping": None}) == (1.0, 0.0)
    assert families.head_scaling({"model_type": "llama"}) == (1.0, 0.0)
    # a scaling key in a family without a rule: no guess
    assert families.head_scaling({"model_type": "newfamily", "logit_scale": 0.5}) is None


def test_mlx_refuses_sequences_past_an_ignored_sliding_window(assets):
    """mlx-lm's mistral attends over everything: exact up to the window, refused past it."""
    backend = get_backend("mlx")
    folder = build(assets["root"] / "families" / "mistral-window-4", assets["tokenizer"], "mistral",
                   {"sliding_window": 4}, 0)
    model = backend.load_model(str(folder), trainable=False, dtype="float32")
    short = np.array([[1, 5, 9, 30]], dtype=np.int64)
    np.testing.assert_allclose(logits_of(backend, model, short), transformers_logits(folder, short), atol=1e-4)
    with pytest.raises(families.FamilyError, match="window of 4 tokens; sequences of 5 tokens"):
        logits_of(backend, model, np.array([[1, 5, 9, 30, 70]], dtype=np.int64))
    assert families.mlx_exact_length({"model_type": "qwen2", "sliding_window": 4096,
                                      "layer_types": ["full_attention"] * 2}) is None
    assert families.mlx_exact_length({"model_type": "gemma2", "sliding_window": 4096,
                                      "layer_types": ["sliding_attention", "full_attention"]}) == 4096


def test_mlx_names_a_family_it_has_no_code_for(tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from hpd.backends.mlx import family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nosuchfamily"}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((2,))})
    with pytest.raises(families.FamilyError, match=r"nosuchfamily: mlx-lm \S+ has no model code for this family"):
        family.load(tmp_path)
