"""The small chat models and rows that chat_vs_trl, packing_throughput and memory_peak train:
a byte-level BPE of 4096 tokens, a Qwen2 teacher of ~4.9M parameters and a student of ~1.8M
(tied embeddings, random weights), and prompt/completion rows of made-up words whose token
counts are drawn from given ranges. Built offline and seeded."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 4096
# (prompt tokens, completion tokens) drawn uniformly per row; each row is ~61 tokens with
# its BOS and EOS, so the shapes differ only in how much of the row is supervised
SHAPES = {
    "chat": ((18, 26), (33, 41)),  # ~38% prompt: the shape of an outside chat workload
    "prompt-heavy": ((42, 50), (9, 17)),  # ~75% prompt: a long question, a short answer
    "response-heavy": ((2, 6), (49, 57)),  # ~8% prompt: almost every position is a target
}


def build_assets(root: Path, rows: int, seed: int = 0, prompt=(18, 26), completion=(33, 41)) -> None:
    """Tokenizer (byte-level BPE, 4096 entries), the two Qwen2 models and prompt/completion
    rows (token counts drawn uniformly from the `prompt` and `completion` ranges; the row
    adds a BOS and an EOS)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    # transformers builds Qwen2Tokenizer for a qwen2 folder (its own pre-tokenizer regex
    # over byte-level BPE): so the tokenizer is a byte-level BPE trained here
    rng = random.Random(seed)
    lexicon = _lexicon(rng)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((" ".join(rng.choices(lexicon, k=12)) for _ in range(40000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    for name, (hidden, layers, inter, heads) in {"teacher": (256, 4, 1024, 8), "student": (128, 5, 512, 4)}.items():
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, use_cache=False)
        torch.manual_seed(1 if name == "teacher" else 2)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        config = json.loads((root / name / "config.json").read_text())
        config["rope_theta"] = 10000.0
        (root / name / "config.json").write_text(json.dumps(config))

    write_rows(root / "train.jsonl", tok, lexicon, rows, prompt, completion, seed)


def _lexicon(rng) -> list[str]:
    """20000 made-up words of one to four syllables."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]


def write_rows(path: Path, tok, lexicon, rows: int, prompt, completion, seed: int = 0) -> None:
    """prompt/completion rows of words from `lexicon`, their token counts drawn uniformly
    from the `prompt` and `completion` ranges (`tok`: a tokenizers.Tokenizer)."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:  # words until the text is about `tokens` tokens long
        words: list[str] = []
        while (have := len(tok.encode(" ".join(words)).ids)) < tokens:
            words += rng.choices(lexicon, k=max(1, (tokens - have) // 3))
        return " ".join(words)

    with open(path, "w") as fh:
        for _ in range(rows):
            row = {"prompt": text(rng.randint(*prompt)), "completion": text(rng.randint(*completion))}
            fh.write(json.dumps(row) + "\n")


def build_shapes(root: Path, rows: int, shapes, seed: int = 0) -> dict[str, str]:
    """The tokenizer and models once (build_assets), then one rows file per shape."""
    from tokenizers import Tokenizer

    build_assets(root, rows, seed, *SHAPES[shapes[0]])
    tok = Tokenizer.from_file(str(root / "student" / "tokenizer.json"))
    lexicon = _lexicon(random.Random(seed))  # build_assets' words: the same seed, the same first draws
    files = {shapes[0]: str(root / "train.jsonl")}
    for name in shapes[1:]:
        files[name] = str(root / f"train-{name}.jsonl")
        write_rows(Path(files[name]), tok, lexicon, rows, *SHAPES[name], seed=seed)
    return files


def param_count(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
