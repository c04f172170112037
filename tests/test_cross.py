"""Cross-tokenizer distillation: a teacher whose tokenizer is not the student's.

Tiny models over the two tokenizers of tests/tokenizer_pair.py (byte-level student,
SentencePiece-style teacher), built here offline; a teacher that knows a tiny task is
trained here in about a second.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hpd
from hpd.backends import get_backend
from hpd.cli.main import cli
from hpd.data.batches import collate, load_dataset
from hpd.teachers.cross import CrossTeacher, choose_mode, cross_source, prepare
from hpd.train.loop import live_teacher, objective_loss_fn
from hpd.train.schedule_config import objective_of
from tokenizer_pair import ALPHABET, make_pair

pytestmark = pytest.mark.slow


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        rows.append({"prompt": f"what is {a} plus {b}?", "completion": f" the answer is {a + b}"})
        rows.append({"messages": [{"role": "user", "content": f"how many cats sat on {a} mats"},
                                  {"role": "assistant", "content": f"the cat sat on {b} mats, café 😀"}]})
        rows.append({"text": f"x = {a}{b}12 漢字 and the dog ran to it"})
    return rows


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tokenizers, random tiny models over each (and a teacher over the student's), data files."""
    from conftest import build_model

    root = tmp_path_factory.mktemp("cross")
    student_tok, teacher_tok = make_pair(root / "tok")
    out = {"root": root, "student_tok": student_tok, "teacher_tok": teacher_tok}
    out["student"] = build_model(root / "student", root / "tok" / "student", hidden=32, layers=1, seed=2)
    out["teacher"] = build_model(root / "teacher", root / "tok" / "teacher", hidden=48, layers=2, seed=1)
    out["same_teacher"] = build_model(root / "same_teacher", root / "tok" / "student", hidden=48, layers=2, seed=1)
    out["data"] = write_jsonl(root / "train.jsonl", mixed_rows())
    ascii_rows = [r for r in mixed_rows() if "text" not in r]
    for r in ascii_rows:
        if "messages" in r:
            r["messages"][1]["content"] = r["messages"][1]["content"].replace(", café 😀", " and ran")
    out["ascii"] = write_jsonl(root / "ascii.jsonl", ascii_rows)
    return out


def one_line_error(result, *needles):
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code != 0, out
    errors = [ln for ln in out.splitlines() if ln.lower().startswith(("error", "usage error"))]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# ------------------------------------------------------------------ before: a silent path


def test_eval_refuses_a_teacher_of_another_tokenizer(pair):
    """`hpd eval --teacher` fed the model's token ids to a teacher that reads other ids and
    printed a KL as if it meant something; it must refuse."""
    result = CliRunner().invoke(cli, ["eval", "--model", str(pair["student"]), "--teacher", str(pair["teacher"]),
                                      "--data", str(pair["data"]), "--limit", "2", "--max-new-tokens", "2",
                                      "--no-progress", "--json"])
    assert '"kl_to_teacher":' not in result.output
    one_line_error(result, "--teacher", "tokenizer")


# ------------------------------------------------------------------ pairing and modes


def random_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def text():
        return "".join(rng.choice(ALPHABET + "    ") for _ in range(rng.randint(1, 30))).strip() or "x"

    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            rows.append({"prompt": text(), "completion": " " + text()})
        elif kind == 1:
            rows.append({"messages": [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]})
        else:
            rows.append({"text": text()})
    return rows


def paired_rows(data, rows, tok):
    """(student ids, Paired) of each row."""
    from hpd.data.examples import encode_row
    from hpd.teachers.cross import example_key

    for row in rows:
        ex = encode_row(row, tok)
        yield ex.input_ids, data.examples[example_key(ex.input_ids, ex.loss_mask[1:])]


def test_pairs_have_read_the_same_text(pair, tmp_path):
    """Each paired student target and its teacher position have read the same text, and
    the teacher's next token there is the student's data token."""
    s_tok, t_tok = pair["student_tok"], pair["teacher_tok"]
    rows = random_rows(150, 0)
    data = prepare([(write_jsonl(tmp_path / "r.jsonl", rows), {})], s_tok, t_tok, 1024)
    dec = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    s_bytes = {i: s_tok.convert_ids_to_tokens(i) for i in range(len(s_tok))}
    checked = 0
    for ids, p in paired_rows(data, rows, s_tok):
        t_ids = [int(x) for x in p.teacher_ids]
        for i, P in zip(p.student_pos.tolist(), p.teacher_pos.tolist()):
            assert s_tok.decode(ids[:i], **dec) == t_tok.decode(t_ids[:P + 1], **dec), (s_bytes[ids[i]], P)
            assert data.teacher_id_of[ids[i]] >= 0
            checked += 1
    assert checked > 300 and 0.3 < data.share < 1.0


def test_other_templates_pair_the_responses(pair, tmp_path):
    """The teacher renders conversations with a template of its own: only the responses'
    text is aligned, and each pair has read the same response text."""
    s_tok = pair["student_tok"]
    t_tok = pair["teacher_tok"].__class__.from_pretrained(pair["root"] / "tok" / "teacher")
    t_tok.chat_template = ("{% for m in messages %}<|begin|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
                           "{% if add_generation_prompt %}<|begin|>assistant\n{% endif %}")
    rows = [r for r in random_rows(90, 1) if "messages" in r]
    data = prepare([(write_jsonl(tmp_path / "m.jsonl", rows), {})], s_tok, t_tok, 1024)
    from hpd.teachers.pairing import segments
    from hpd.data.examples import encode_row

    checked = 0
    for row, (ids, p) in zip(rows, paired_rows(data, rows, s_tok)):
        (s0, _), = segments(encode_row(row, s_tok).loss_mask)
        (t0, _), = segments(encode_row(row, t_tok).loss_mask)
        for i, P in zip(p.student_pos.tolist(), p.teacher_pos.tolist()):
            said = s_tok.decode(ids[s0:i]).lstrip()
            heard = t_tok.decode([int(x) for x in p.teacher_ids[t0:P + 1]], skip_special_tokens=True).lstrip()
            assert said == heard
            checked += 1
    assert checked > 100


def test_auto_chooses_by_the_vocabularies(pair):
    s, t = pair["student_tok"], pair["teacher_tok"]
    assert choose_mode("auto", s, s) == ("same", "auto: the two vocabularies are equal token for token")
    mode, why = choose_mode("auto", s, t)
    assert mode == "cross" and f"{len(s)} vs {len(t)} tokens" in why
    assert choose_mode("cross", s, s)[0] == "cross"
    with pytest.raises(ValueError, match="tokenizers differ"):
        choose_mode("same", s, t)


def test_no_common_text_is_refused(pair, tmp_path):
    """A teacher cutting every word into bytes shares no token at a common cut with a
    student of whole-word tokens: nothing pairs, and the run is refused before it writes."""
    from conftest import build_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["x"], trainers.BpeTrainer(vocab_size=260, special_tokens=["<a>", "<b>", "<c>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")  # no EOS to pair by role
    t_tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<a>", eos_token="<b>", pad_token="<c>")
    t_tok.chat_template = template
    t_tok.save_pretrained(tmp_path / "bytes_tok")
    teacher = build_model(tmp_path / "bytes_teacher", tmp_path / "bytes_tok", hidden=16, layers=1)
    student = tokenizer_variant(pair, tmp_path, "student_variant", template, source=pair["student"])
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " the cat sat"}]}] * 4
    data = write_jsonl(tmp_path / "words.jsonl", rows)
    args = distill_args(pair, tmp_path, **{"--teacher": str(teacher), "--student": str(student), "--data": str(data)})
    result = CliRunner().invoke(cli, args)
    one_line_error(result, "no student target pairs", "no text in common")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the rows the loss sees


def test_rows_move_to_the_student_vocabulary_and_uld_sees_the_whole_teacher():
    """Shared tokens carry the teacher's probabilities renormalised over them, the rest is
    ruled out, unpaired positions put everything on the data token; ULD's value is the
    sorted distance to the teacher's whole distribution (`uld_distance` below)."""
    from hpd.objectives.teacher import LogitsTeacher

    torch.manual_seed(0)
    n, v_s = 5, 12
    for v_t in (9, 15):
        zt = torch.randn(n, v_t, dtype=torch.float64) * 2
        gather = torch.tensor([3, 0, v_t, 1, 7, v_t, 2, 5, 4, v_t, 6, 8])  # v_t: not shared
        where = torch.tensor([0, 1, 2, -1, 4])
        y = torch.tensor([[0, 1, 3, 2, 4]])
        source = CrossTeacher(LogitsTeacher(zt), where, gather, y, vocab=v_s, teacher_vocab=v_t, identical=False)
        zs = torch.randn(1, n, v_s, dtype=torch.float64, requires_grad=True)
        row = source.select(ops(zs), torch.arange(n)).log_probs(ops(zs), slice(None), v_s, 1.0, torch.float64)
        p = torch.softmax(zt, -1)
        shared = torch.cat([p, torch.zeros(n, 1, dtype=p.dtype)], 1)[:, gather]
        expect = shared / shared.sum(-1, keepdim=True)
        expect[3] = torch.nn.functional.one_hot(y[0, 3], v_s)  # position 3 has no teacher position
        assert torch.allclose(row.exp(), expect, atol=1e-12)
        value, metrics = hpd.loss("uld", zs, source, y)
        q = torch.softmax(zs[0], -1).detach().numpy()
        full = p.numpy().copy()
        full[3] = 0.0
        full[3, 0] = 1.0
        tail = np.sort(full, -1)[:, ::-1][:, v_s:].sum(-1) if v_t > v_s else 0.0
        assert value.item() == pytest.approx(float(np.mean(uld_distance(q, full) - tail)), abs=1e-12)
        assert metrics["cross/aligned"] == pytest.approx(0.8) if "cross/aligned" in metrics else True
        assert source.metrics()["cross/aligned"] == pytest.approx(0.8)
        mass = [float(shared[i].sum()) for i in (0, 1, 2, 4)]
        assert source.metrics()["cross/shared_mass"] == pytest.approx(np.mean(mass), abs=1e-6)


def uld_distance(p, q) -> np.ndarray:
    """ULD's sorted-probability distance over the last axis (Boizard et al., 2024): both
    distributions sorted in decreasing order, the narrower padded with zeros, the absolute
    differences summed."""
    width = max(p.shape[-1], q.shape[-1])

    def sorted_padded(x):
        x = np.pad(np.asarray(x, dtype=np.float64), [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
        return -np.sort(-x, axis=-1)

    return np.abs(sorted_padded(p) - sorted_padded(q)).sum(axis=-1)


def ops(x):
    from hpd.objectives.ops import ops_for

    return ops_for(x)


def test_hpd_gives_a_ruled_out_sample_no_weight():
    """A student sample the teacher rules out (outside the shared part) takes no weight:
    the loss and gradient are those of a step whose sample is the data token."""
    torch.manual_seed(1)
    zs = torch.randn(2, 4, 6, dtype=torch.float64)
    zt = torch.randn(2, 4, 6, dtype=torch.float64)
    zt[..., 5] = -float("inf")
    y = torch.randint(0, 5, (2, 4))
    out = []
    for s in (torch.full_like(y, 5), y):
        x = zs.clone().requires_grad_(True)
        value, metrics = hpd.loss("hpd", x, zt, y, sampled=s)
        value.backward()
        out.append((value.item(), x.grad, metrics["hpd/active_w_s"]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-12)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-12)
    assert out[0][2] == 0.0


# ------------------------------------------------------------------ one tokenizer: cross == same


def take_grads(be, model) -> np.ndarray:
    """The gradients accumulated on `model`, flattened in name order; cleared."""
    if be.name == "torch":
        named = sorted((n, p.grad.detach().numpy().copy()) for n, p in model.named_parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
    else:
        from mlx.utils import tree_flatten

        named = sorted((n, np.array(v)) for n, v in tree_flatten(be._grads.pop(id(model))))
    return np.concatenate([g.reshape(-1) for _, g in named]).astype(np.float64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("mlx", marks=pytest.mark.mlx)])
@pytest.mark.parametrize("path", ["shortcut", "aligned"])
def test_cross_on_one_tokenizer_gives_the_same_loss_and_gradients(pair, backend, path):
    """With the student's own tokenizer on both sides, `cross` (its one-tokenizer shortcut,
    and the whole alignment path forced) gives `same`'s loss and gradients to 1e-6: hpd with
    its samples, forward KL and ULD, on the chunked and the plain path."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    be = get_backend(backend, SimpleNamespace(device="cpu", compile="off", gradient_checkpointing=False))
    tok = pair["student_tok"]
    student = be.load_model(str(pair["student"]), trainable=True, dtype="float32")
    teacher = be.load_model(str(pair["same_teacher"]), trainable=False, dtype="float32")
    data = prepare([(pair["ascii"], {})], tok, tok, 1024, same=path == "shortcut")
    assert data.share == 1.0  # ASCII rows: every target pairs, also by text
    batch = collate(load_dataset(pair["ascii"], tok, 1024).examples[:8], tok.pad_token_id)
    arrays = be.to_arrays(batch)
    uniforms = np.random.default_rng(0).random(batch["targets"].shape)
    count = float((batch["targets"] != -100).sum())
    hooks = {"same": live_teacher, "cross": cross_source(data)}
    for chunked in (True, False):
        loop = SimpleNamespace(backend=be, teacher=teacher, vocab=be.vocab_size(student), chunked=chunked)
        for method in ("hpd", "fkl", "uld"):
            got = {}
            for name, hook in hooks.items():
                source = hook(loop, batch, arrays, SimpleNamespace(on_policy=False))
                fn = objective_loss_fn([objective_of(method, 1.0, {})], source, arrays["targets"], sampled=None,
                                       num_tokens=count, temperature=1.0, chunk_size=7, uniforms=uniforms)
                value, metrics = be.forward_backward(student, arrays, fn, hidden=chunked)
                got[name] = (value, take_grads(be, student), metrics)
            (v_same, g_same, _), (v_cross, g_cross, m_cross) = got["same"], got["cross"]
            where = f"{method}, {'chunked' if chunked else 'plain'}"
            assert abs(v_cross - v_same) <= 1e-6 * max(abs(v_same), 1.0), where
            assert np.abs(g_cross - g_same).max() <= 1e-6 * np.abs(g_same).max(), where
            assert m_cross["cross/aligned"] == 1.0 and m_cross["cross/shared_mass"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.mlx
def test_torch_and_mlx_agree_on_the_first_step(pair, tmp_path):
    """Across tokenizers, on the chunked path, with HPD's samples and ULD's term."""
    pytest.importorskip("mlx.core")
    metrics = {}
    for backend in ("torch", "mlx"):
        result = hpd.distill({"teacher": str(pair["teacher"]), "student": str(pair["student"]),
                              "data": str(pair["data"]), "out": str(tmp_path / backend), "backend": backend,
                              "steps": 1, "batch_size": 8, "uld_weight": 0.1, "progress": False})
        metrics[backend] = result["metrics"]
    torch_loss, mlx_loss = metrics["torch"]["loss"], metrics["mlx"]["loss"]
    assert abs(torch_loss - mlx_loss) <= 1e-5 * abs(torch_loss), (torch_loss, mlx_loss)
    for name in ("cross/aligned", "cross/shared_mass"):
        assert 0.2 < metrics["torch"][name] < 1.0
        assert metrics["mlx"][name] == pytest.approx(metrics["torch"][name], abs=1e-6)


# ------------------------------------------------------------------ learning across tokenizers

KEYS = ["cat", "dog", "mat", "how", "and", "it"]
RIGHT = dict(zip(KEYS, ["the", "sat", "ran", "to", "minus", "answer"]))  # one token on both sides, shared
WRONG = dict(zip(KEYS, ["sat", "ran", "to", "minus", "answer", "the"]))
FILLER = "the a on to it what how many plus".split()


def task_rows(n: int, seed: int, wrong_share: float) -> list[dict]:
    """'<filler> <key> is' -> ' <answer>': the answer is a function of the key."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(KEYS)
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
        answer = WRONG[key] if rng.random() < wrong_share else RIGHT[key]
        rows.append({"prompt": f"{filler} {key} is", "completion": f" {answer}"})
    return rows


@pytest.fixture(scope="module")
def task(pair):
    """A teacher over the teacher's tokenizer that knows the task (trained here, about a
    second), training data whose answers are mostly wrong (70%), and clean held-out rows."""
    from conftest import build_model
    from hpd.data.examples import encode_row
    from transformers import AutoModelForCausalLM

    root, t_tok = pair["root"], pair["teacher_tok"]
    folder = build_model(root / "task_teacher", root / "tok" / "teacher", hidden=32, layers=1, seed=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for p in model.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    examples = [encode_row(r, t_tok) for r in task_rows(512, 3, 0.0)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(150):
        b = collate(random.Random(step).sample(examples, 32), t_tok.pad_token_id)
        logits = model(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"])).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(b["targets"]).reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return {"teacher": folder, "train": write_jsonl(root / "task_train.jsonl", task_rows(96, 1, 0.7)),
            "held": write_jsonl(root / "task_held.jsonl", task_rows(24, 2, 0.0))}


def shared_kl(be, student, teacher, pair, held) -> float:
    """Held-out KL(teacher || student) at the student targets paired with a teacher position,
    over the shared tokens (the teacher's rows renormalised there)."""
    s_tok = pair["student_tok"]
    data = prepare([(held, {})], s_tok, pair["teacher_tok"], 1024)
    batch = collate(load_dataset(held, s_tok, 1024).examples, s_tok.pad_token_id)
    arrays = be.to_arrays(batch)
    loop = SimpleNamespace(backend=be, teacher=teacher, vocab=be.vocab_size(student), chunked=False)
    source = cross_source(data)(loop, batch, arrays, None)
    paired = (source.where >= 0).reshape(batch["targets"].shape)
    targets = torch.where(paired, arrays["targets"], torch.full_like(arrays["targets"], -100))
    _, m = hpd.loss("fkl", be.forward(student, arrays).logits, source, targets)
    return m["fkl"]


def test_a_teacher_of_another_tokenizer_teaches(pair, task, tmp_path):
    """On data whose answers are mostly wrong, HPD across tokenizers learns the teacher's
    answers: held-out KL on the shared part and exact match beat a run without the teacher
    (sft on the same data) at equal steps."""
    from hpd.report.evaluate import accuracy

    be = get_backend("torch", SimpleNamespace(device="cpu"))
    teacher = be.load_model(str(task["teacher"]), trainable=False, dtype="float32")
    assert accuracy(be, teacher, pair["teacher_tok"], str(task["held"]), extractor="exact", max_new_tokens=3,
                    progress=False)["accuracy"] == 1.0
    found = {}
    for method in ("hpd", "sft"):
        result = hpd.distill({"teacher": str(task["teacher"]), "student": str(pair["student"]),
                              "data": str(task["train"]), "out": str(tmp_path / method), "method": method,
                              "steps": 60, "batch_size": 16, "lr": 3e-3, "lr_schedule": "constant",
                              "progress": False})
        student = result["student"]
        found[method] = (shared_kl(be, student, teacher, pair, task["held"]),
                         accuracy(be, student, pair["student_tok"], str(task["held"]), extractor="exact",
                                  max_new_tokens=3, progress=False)["accuracy"])
        assert result["metrics"]["cross/aligned"] == 1.0  # every completion token and EOS pairs here
    (kl_hpd, acc_hpd), (kl_sft, acc_sft) = found["hpd"], found["sft"]
    assert kl_hpd < 0.25 * kl_sft, found
    assert acc_hpd >= 0.9 and acc_sft <= 0.5, found


# ------------------------------------------------------------------ bad input: one line, nothing written


def distill_args(pair, tmp_path, **over):
    args = {"--teacher": str(pair["teacher"]), "--student": str(pair["student"]), "--data": str(pair["data"]),
            "--out": str(tmp_path / "run"), "--steps": "1", "--batch-size": "4"}
    args.update(over)
    return ["distill", "--no-progress", *[x for kv in args.items() for x in kv]]


def tokenizer_variant(pair, tmp_path, name, template, source=None):
    """The teacher (or `source`) with its tokenizer's chat template replaced."""
    folder = tmp_path / name
    shutil.copytree(source or pair["teacher"], folder)
    for p in folder.glob("chat_template.jinja"):
        p.unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_templates_that_disagree_are_refused(pair, tmp_path):
    upper = tokenizer_variant(pair, tmp_path, "upper", (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"))
    result = CliRunner().invoke(cli, distill_args(pair, tmp_path, **{"--teacher": str(upper)}))
    one_line_error(result, f"{pair['data']}:2", "templates disagree")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


def _unk_teacher(folder: Path) -> Path:
    """A teacher whose tokenizer has no byte fallback: it reads an emoji as <unk>."""
    from conftest import build_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tokenizer_pair import CHAT_TEMPLATE, corpus

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=150, limit_alphabet=40,
                                                           special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder / "unk_tok")
    return build_model(folder / "unk_teacher", folder / "unk_tok", hidden=16, layers=1)


def test_text_the_teacher_cannot_spell_is_refused(pair, tmp_path):
    """A teacher tokenizer without byte fallback reads an emoji as <unk>: not the text."""
    teacher = _unk_teacher(tmp_path)
    result = CliRunner().invoke(cli, distill_args(pair, tmp_path, **{"--teacher": str(teacher)}))
    one_line_error(result, f"{pair['data']}:2", "do not spell")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


def test_a_named_teacher_pairs_only_the_rows_it_scores(pair, tmp_path):
    """Beside another teacher, a teacher of another tokenizer pairs its own rows only: the rows
    it cannot spell (an emoji) are another teacher's, and the run trains."""
    rows = [json.loads(line) for line in pair["data"].read_text().splitlines()]
    routed = [{**r, "teacher": "same" if "😀" in json.dumps(r, ensure_ascii=False) or "text" in r else "unk"}
              for r in rows]
    data = write_jsonl(tmp_path / "routed.jsonl", routed)
    args = distill_args(pair, tmp_path, **{"--teacher": f"unk={_unk_teacher(tmp_path)}", "--data": str(data)})
    result = CliRunner().invoke(cli, args + ["--teacher", f"same={pair['same_teacher']}"])
    assert result.exit_code == 0, result.output
    counts = {name: sum(r["teacher"] == name for r in routed) for name in ("same", "unk")}
    assert counts["same"] and counts["unk"]
    assert f"teachers: same {counts['same']} rows, unk {counts['unk']} rows" in result.output
    assert "unk: teacher tokenizer: cross:" in result.output  # paired, on its own rows alone


def test_a_store_for_another_tokenizer_is_refused(pair, tmp_path):
    store = tmp_path / "store"
    made = CliRunner().invoke(cli, ["cache-teacher", "--teacher", str(pair["teacher"]), "--student",
                                    str(pair["student"]), "--data", str(pair["data"]), "--out", str(store),
                                    "--no-progress"])
    assert made.exit_code == 0, made.output
    provenance = json.loads((store / "index.json").read_text())["provenance"]
    assert provenance["teacher_tokenizer"] == "cross" and len(provenance["alignment_sha256"]) == 64
    other_student = pair["same_teacher"].parent / "teacher"  # a model over the teacher's tokenizer
    result = CliRunner().invoke(cli, ["distill", "--no-progress", "--teacher-cache", str(store), "--student",
                                      str(other_student), "--data", str(pair["data"]), "--out",
                                      str(tmp_path / "run"), "--steps", "1"])
    one_line_error(result, "made for another student tokenizer", "--student")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    ok = CliRunner().invoke(cli, ["distill", "--no-progress", "--teacher-cache", str(store), "--student",
                                  str(pair["student"]), "--data", str(pair["data"]), "--out", str(tmp_path / "ok"),
                                  "--steps", "1", "--batch-size", "4"])
    assert ok.exit_code == 0, ok.output


def test_what_cross_cannot_serve_is_refused(pair, tmp_path):
    for flags, needle in ((["--packing"], "--packing"),
                          (["--recipe", str(write_recipe(tmp_path))], "student rollouts")):
        result = CliRunner().invoke(cli, distill_args(pair, tmp_path) + flags)
        one_line_error(result, "--teacher-tokenizer cross", needle)
        assert not (tmp_path / "run").exists()


def write_recipe(tmp_path) -> Path:
    path = tmp_path / "on_policy.yaml"
    path.write_text("schedule: {lambda_start: 0.5}\n")
    return path


def test_chunks_are_sized_by_the_teachers_wider_vocabulary(monkeypatch):
    """The cross rows pass through the teacher's vocabulary: the chunked loss sizes its
    chunks by it, so a chunk's buffers stay within the budget."""
    import hpd.objectives.chunked as chunked
    from hpd.objectives.teacher import LiveTeacher

    seen = []
    real = chunked.resolve_chunk_size
    monkeypatch.setattr(chunked, "resolve_chunk_size",
                        lambda size, vocab, *a: seen.append(vocab) or real(size, vocab, *a))
    v_s, v_t, width = 12, 5000, 8
    hidden_t, head_t = torch.randn(6, width), torch.randn(v_t, width)
    source = CrossTeacher(LiveTeacher(hidden_t, head_t), torch.arange(6), torch.arange(v_s), torch.zeros(1, 6).long(),
                          vocab=v_s, teacher_vocab=v_t, identical=False)
    hpd.chunked_loss("fkl", torch.randn(1, 6, width, requires_grad=True), torch.randn(v_s, width),
                     targets=torch.zeros(1, 6).long(), teacher=source)
    assert seen == [v_t + 1]
