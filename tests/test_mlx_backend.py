"""The mlx backend against the torch backend: same loss, gradients and AdamW steps, students
that cross between ecosystems, the CLI, resume and the quantized teacher.

Tolerances (float32 throughout):
- first-step loss and gradient norm: 1e-5 relative (seen: ~1e-7);
- weights after 5 AdamW steps at lr 1e-2: 5e-4 absolute, with every tensor moved by more
  than 20 times that (seen: ~5e-5; Adam's normalised update magnifies last-bit gradient
  differences where a gradient is tiny);
- exported logits against the in-memory student: 1e-4 absolute (seen: ~2e-6);
- resume: bitwise equal weights (the same mlx ops run in the same order).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'hpd-distill[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'hpd-distill[mlx]')")

from mlx.utils import tree_flatten  # noqa: E402

from hpd.data.batches import collate, load_dataset  # noqa: E402
from hpd.data.examples import pad_id_of  # noqa: E402
from hpd.train.config import DistillConfig  # noqa: E402
from hpd.train.loop import objective_loss_fn, target_count  # noqa: E402

pytestmark = pytest.mark.mlx

LR = 1e-2
IDS = [[1, 5, 9, 30, 70, 2, 100, 44, 17, 3]]


def mlx_backend():
    from hpd.backends.mlx import MlxBackend

    return MlxBackend()


def mlx_weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def torch_weights(model) -> dict[str, np.ndarray]:
    return {k: p.detach().cpu().numpy() for k, p in model.named_parameters()}


def train_directly(backend, assets, family: str, method: str, hidden: bool, steps: int = 5):
    """`steps` optimizer steps on one fixed batch with fixed samples, calling the backend
    as the loop does; returns [(loss, grad_norm)], the student's weights before and after."""
    cfg = DistillConfig(lr=LR, weight_decay=0.1)
    backend.seed(0)
    tok = backend.load_tokenizer(str(assets[f"{family}student"]))
    data = load_dataset(assets["data"], tok, 48)
    batch = collate(data.examples[:4], pad_id_of(tok))
    samples = np.random.default_rng(0).integers(0, len(tok), size=batch["targets"].shape)
    teacher = backend.load_model(str(assets[f"{family}teacher"]), trainable=False, dtype="float32")
    student = backend.load_model(str(assets[f"{family}student"]), trainable=True, dtype="float32")
    weights = torch_weights if backend.name == "torch" else mlx_weights
    before = weights(student)
    optimizer = backend.make_optimizer(student, cfg)
    tokens = float(target_count(batch["targets"], backend.vocab_size(student)))
    objectives = [SimpleNamespace(method=method, weight=1.0, params={})]
    history = []
    for _ in range(steps):
        arrays = backend.to_arrays(batch)
        sampled = backend.to_arrays({"s": samples})["s"]
        teacher_out = backend.forward(teacher, arrays, hidden=hidden)
        loss_fn = objective_loss_fn(objectives, teacher_out, arrays["targets"], sampled=sampled,
                                    num_tokens=tokens, temperature=1.0, chunk_size=32)
        value, _ = backend.forward_backward(student, arrays, loss_fn, hidden=hidden)
        history.append((value, backend.optimizer_step(student, optimizer, LR, 1.0)))
    return history, before, weights(student)


@pytest.mark.slow
@pytest.mark.parametrize("family,method,hidden", [("", "hpd", False), ("qwen_", "fkl", True)],
                         ids=["llama-untied-hpd-logits", "qwen2-tied-fkl-chunked"])
def test_parity_with_torch(assets, family, method, hidden):
    pytest.importorskip("torch")
    from hpd.backends.torch import TorchBackend

    t_hist, _, t_after = train_directly(TorchBackend(), assets, family, method, hidden)
    m_hist, m_before, m_after = train_directly(mlx_backend(), assets, family, method, hidden)

    (t_loss, t_norm), (m_loss, m_norm) = t_hist[0], m_hist[0]
    assert m_loss == pytest.approx(t_loss, rel=1e-5, abs=1e-7)
    assert m_norm == pytest.approx(t_norm, rel=1e-5)
    assert set(m_after) == set(t_after), "both backends must see the same parameter names"
    for name, w in m_after.items():
        np.testing.assert_allclose(w, t_after[name], rtol=0, atol=5e-4, err_msg=name)
        assert np.abs(w - m_before[name]).max() > 20 * 5e-4, f"{name} did not move: the check would be vacuous"


def test_optimizer_matches_torch_adamw_on_one_tensor():
    """Bias correction, eps and decoupled weight decay (only on >= 2-D) as torch.optim.AdamW."""
    torch = pytest.importorskip("torch")
    import mlx.nn as nn
    from hpd.backends.torch import TorchBackend

    cfg = DistillConfig(lr=0.1, weight_decay=0.5, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-3)
    rng = np.random.default_rng(1)
    w0, b0 = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32))
             for _ in range(4)]

    tmodel = torch.nn.Linear(4, 3)
    with torch.no_grad():
        tmodel.weight.copy_(torch.from_numpy(w0))
        tmodel.bias.copy_(torch.from_numpy(b0))
    tb = TorchBackend()
    topt = tb.make_optimizer(tmodel, cfg)

    backend = mlx_backend()
    mmodel = nn.Linear(4, 3)
    mmodel.update({"weight": mx.array(w0), "bias": mx.array(b0)})
    mopt = backend.make_optimizer(mmodel, cfg)
    for step, (gw, gb) in enumerate(grads):
        lr = 0.1 / (step + 1)
        tmodel.weight.grad, tmodel.bias.grad = torch.tensor(gw), torch.tensor(gb)  # torch clips in place
        t_norm = tb.optimizer_step(tmodel, topt, lr, 2.0)
        backend._grads[id(mmodel)] = {"weight": mx.array(gw), "bias": mx.array(gb)}
        m_norm = backend.optimizer_step(mmodel, mopt, lr, 2.0)
        assert m_norm == pytest.approx(t_norm, rel=1e-6)
    np.testing.assert_allclose(np.array(mmodel.weight), tmodel.weight.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(np.array(mmodel.bias), tmodel.bias.detach().numpy(), atol=2e-6)


def test_accumulation_equals_one_batch(assets):
    """Four micro-batches of one row, accumulated, equal one batch of four rows."""
    backend = mlx_backend()
    tok = backend.load_tokenizer(str(assets["student"]))
    rows = load_dataset(assets["data"], tok, 48).examples[:4]
    teacher = backend.load_model(str(assets["teacher"]), trainable=False, dtype="float32")
    objectives = [SimpleNamespace(method="fkl", weight=1.0, params={})]
    results = []
    for split in ([rows], [[r] for r in rows]):
        student = backend.load_model(str(assets["student"]), trainable=True, dtype="float32")
        optimizer = backend.make_optimizer(student, DistillConfig(lr=LR))
        tokens = float(sum(target_count(collate(b, pad_id_of(tok))["targets"], 10**6) for b in split))
        total = 0.0
        for micro in split:
            arrays = backend.to_arrays(collate(micro, pad_id_of(tok)))
            loss_fn = objective_loss_fn(objectives, backend.forward(teacher, arrays), arrays["targets"],
                                        sampled=None, num_tokens=tokens, temperature=1.0, chunk_size=32)
            total += backend.forward_backward(student, arrays, loss_fn)[0]
        results.append((total, backend.optimizer_step(student, optimizer, LR, 0.0), mlx_weights(student)))
    (loss_a, norm_a, w_a), (loss_b, norm_b, w_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert norm_b == pytest.approx(norm_a, rel=1e-4)
    for name in w_a:
        np.testing.assert_allclose(w_b[name], w_a[name], atol=1e-5, err_msg=name)


def run_distill(assets, out: Path, backend: str, **overrides):
    import hpd

    config = {"teacher": str(assets["teacher"]), "student": str(assets["student"]), "data": str(assets["data"]),
              "out": str(out), "backend": backend, "steps": 2, "batch_size": 4, "max_length": 48, "lr": LR,
              "progress": False, **overrides}
    return hpd.distill(config)


def test_cross_export(assets, tmp_path):
    torch = pytest.importorskip("torch")
    import mlx_lm
    from transformers import AutoModelForCausalLM

    trained = run_distill(assets, tmp_path / "torch_student", "torch")
    with torch.no_grad():
        want = trained["student"](torch.tensor(IDS)).logits.numpy()
    model, tokenizer = mlx_lm.load(trained["out"])
    got = np.array(model(mx.array(IDS)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert tokenizer.encode("the cat sat") == trained["tokenizer"].encode("the cat sat")

    trained = run_distill(assets, tmp_path / "mlx_student", "mlx")
    want = np.array(trained["student"](mx.array(IDS)))
    hf = AutoModelForCausalLM.from_pretrained(trained["out"])
    assert hf.dtype == torch.float32
    with torch.no_grad():
        got = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    reloaded, _ = mlx_lm.load(trained["out"])
    np.testing.assert_allclose(np.array(reloaded(mx.array(IDS))), want, atol=1e-6)
    assert np.abs(want - np.array(mlx_backend().load_model(str(assets["student"]), trainable=False)(
        mx.array(IDS)))).max() > 1e-3, "training must have changed the student"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hpd", "fkl"])
def test_cli_end_to_end(assets, tmp_path, method):
    from click.testing import CliRunner
    from hpd.cli.main import cli

    from hpd.models.export import check_model_folder

    out = tmp_path / method
    args = ["distill", "--backend", "mlx", "--method", method, "--teacher", str(assets["qwen_teacher"]),
            "--student", str(assets["qwen_student"]), "--data", str(assets["data"]), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--max-length", "48", "--lr", "1e-3", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "done: 3 steps" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    check_model_folder(out)
    assert json.loads((out / "hpd_export.json").read_text())["backend"] == "mlx"


@pytest.mark.slow
def test_resume_equals_uninterrupted(assets, tmp_path):
    """2 steps, then --resume to 4, gives the weights of 4 steps in one go. Plain loss path,
    so the student samples come from mlx's RNG, whose state the checkpoint must restore."""
    common = dict(method="hpd", lr_schedule="constant", chunked="off", seed=3)
    run_distill(assets, tmp_path / "split", "mlx", steps=2, **common)
    resumed = run_distill(assets, tmp_path / "split", "mlx", steps=4, resume=True, **common)
    straight = run_distill(assets, tmp_path / "straight", "mlx", steps=4, **common)
    assert resumed["steps"] == straight["steps"] == 4
    a, b = mlx_weights(resumed["student"]), mlx_weights(straight["student"])
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]


def test_quantized_teacher(assets, tmp_path):
    from conftest import build_model
    from hpd.backends.mlx.loading import param_bytes

    folder = build_model(tmp_path / "teacher64", assets["tokenizer"], hidden=64, layers=2, seed=1)
    backend = mlx_backend()
    full = backend.load_model(str(folder), trainable=False, dtype="float32")
    sizes = {}
    for bits in (8, 4):
        q = backend.load_model(str(folder), trainable=False, dtype="float32", quantize=bits)
        assert q.hpd_info.layers_quantized == 16  # 2 x 7 linears, the embedding and the head
        assert q.hpd_info.bytes_before_quantize == param_bytes(full)
        sizes[bits] = param_bytes(q)
        assert backend.chunked_blocker(q) is None  # the quantized head runs through the quantized matmul
        assert backend.head_of(q).bits == bits
        logits = np.array(q(mx.array(IDS)))
        assert np.isfinite(logits).all() and logits.shape == (1, len(IDS[0]), backend.vocab_size(q))
    assert sizes[4] < sizes[8] < 0.3 * param_bytes(full)

    result = run_distill(assets, tmp_path / "run", "mlx", teacher=str(folder), teacher_quantize=4)
    assert np.isfinite(result["metrics"]["loss"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)


def test_generate_matches_torch_greedy(assets):
    pytest.importorskip("torch")
    from hpd.backends.torch import TorchBackend

    prompts = [[1, 40, 41, 42], [1, 7, 8]]
    outputs = {}
    for backend in (TorchBackend(), mlx_backend()):
        tok = backend.load_tokenizer(str(assets["student"]))
        model = backend.load_model(str(assets["student"]), trainable=True, dtype="float32")
        outputs[backend.name] = backend.generate(model, tok, prompts, max_new_tokens=8, temperature=1.0,
                                                 top_p=1.0, top_k=0, greedy=True)
        eos = tok.eos_token_id
    assert outputs["mlx"] == outputs["torch"]
    for row in outputs["mlx"]:
        assert 0 < len(row) <= 8 and (eos not in row or row.index(eos) == len(row) - 1)

    backend = mlx_backend()
    backend.seed(5)
    sampled = backend.generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0)
    backend.seed(5)
    assert backend.generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0) == sampled


def test_rng_state_round_trip():
    backend = mlx_backend()
    backend.seed(11)
    mx.random.normal((3,))
    state = backend.rng_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    first = (np.array(mx.random.normal((4,))), np.random.rand(), __import__("random").random())
    mx.random.normal((2,))
    backend.set_rng_state(state)
    again = (np.array(mx.random.normal((4,))), np.random.rand(), __import__("random").random())
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1:] == again[1:]


def test_clear_errors(assets, tmp_path):
    backend = mlx_backend()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backend.load_model(str(tmp_path / "missing"), trainable=True, dtype="auto")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        backend.load_tokenizer("./nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((assets["student"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        backend.load_tokenizer(str(bare))
    with pytest.raises(ValueError, match="only the teacher"):
        backend.load_model(str(assets["student"]), trainable=True, dtype="auto", quantize=4)
    with pytest.raises(ValueError, match="right-padded"):
        backend.to_arrays({"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.array([[0, 1, 1]])})


@pytest.mark.parametrize("family,method", [("", "hpd"), ("qwen_", "fkl")], ids=["llama-untied-hpd", "qwen2-tied-fkl"])
def test_gradient_checkpointing_trains_a_full_student_the_same(assets, tmp_path, family, method):
    """With --gradient-checkpointing the chunked step runs in two passes (an untraced
    forward, the loss's closed-form hidden-state gradient, one vjp of the forward): the
    same losses and weights as the one-pass step, a tied head's gradient included."""
    from mlx.utils import tree_flatten

    common = dict(teacher=str(assets[f"{family}teacher"]), student=str(assets[f"{family}student"]), method=method,
                  steps=3, chunked="on")
    runs = [run_distill(assets, tmp_path / f"gc-{gc}", "mlx", gradient_checkpointing=gc, **common)
            for gc in (False, True)]
    logs = [[json.loads(line) for line in (tmp_path / f"gc-{gc}" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line] for gc in (False, True)]
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-5)
    assert [r["grad_norm"] for r in logs[1]] == pytest.approx([r["grad_norm"] for r in logs[0]], rel=1e-4)
    before = dict(tree_flatten(runs[0]["student"].parameters()))
    after = dict(tree_flatten(runs[1]["student"].parameters()))
    for name, value in before.items():
        np.testing.assert_allclose(np.array(after[name]), np.array(value), rtol=0, atol=1e-5, err_msg=name)
