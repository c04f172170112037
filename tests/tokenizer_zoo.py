"""Tokenizers of the conventions a cross-tokenizer pair meets, chat templates, and seeded rows.

The corpora of the pairing's property test (tests/test_pairing.py) and of
`python -m benchmarks.aligned_share`. Everything is built offline with `tokenizers`,
in memory, in well under a second per tokenizer:

  bpe-400, bpe-800   byte-level BPE (GPT-2's pre-tokenizer and alphabet, 'Ġ' for a space),
                     two vocabulary sizes, so two models of one family cut text differently;
  sp-bpe             SentencePiece-style BPE: '▁' for a space (Metaspace), digits one by
                     one, a small alphabet and '<0xNN>' byte fallback for the rest;
  unigram            SentencePiece-style Unigram with byte fallback, digits not split.

Every tokenizer holds the same special tokens, so any of them can carry any template:

  chatml   <|im_start|>role\\ncontent<|im_end|>\\n   EOS <|im_end|>, a newline after it
  tagged   <|role|>content<|end|>                    EOS <|end|>, nothing after it
  plain    role: content\\n                           no end token (EOS </s> ends a completion)

This module imports no other test module, so benchmarks can import it as `tests.tokenizer_zoo`.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache

WORDS = ("the cat sat on a mat and the dog ran to it café naïve résumé über déjà vu "
         "漢字 日本語 中文 数字 😀 🚀 answer is what how many plus minus equals carry write").split()
CODE = ("def f(x):\n    return x + 1", "for i in range(10):\n    print(i)", "if a == b: {'k': [1, 2]}",
        "x = y * 3.14  # pi")
RARE = list("ßΩЖ🎉龍ñ€")  # not in the training corpus: byte fallback, or bytes for byte-level BPE
PUNCT = list(",.;:!?")

KINDS = {  # name: (algorithm, vocabulary size)
    "bpe-400": ("byte_bpe", 400),
    "bpe-800": ("byte_bpe", 800),
    "sp-bpe": ("sp_bpe", 300),
    "unigram": ("unigram", 400),
}
CONVENTION = {"byte_bpe": "byte-level BPE", "sp_bpe": "SentencePiece BPE", "unigram": "Unigram"}

ROLE_TOKENS = ["<|im_start|>", "<|im_end|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATES = {  # name: (jinja, EOS)
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>"),
    "tagged": ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}", "<|end|>"),
    "plain": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}", "</s>"),
}


def convention(kind: str) -> str:
    return CONVENTION[KINDS[kind][0]]


def content(rng: random.Random, rare: bool = True) -> str:
    """A message: words, numbers of 1 to 7 digits, sums, code, rare characters (unless
    `rare` is False), punctuation, runs of spaces and newlines inside; none at either end
    (chat data is stripped)."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.2:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif r < 0.27:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            parts.append(f"{a}+{b}={a + b}")
        elif r < 0.32:
            parts.append(rng.choice(CODE))
        elif r < 0.37 and rare:
            parts.append(rng.choice(RARE))
        else:
            parts.append(rng.choice(WORDS) + (rng.choice(PUNCT) if rng.random() < 0.15 else ""))
    seps = [rng.choice([" "] * 8 + ["  ", "\n", "\n\n", " \n"]) for _ in parts]
    return "".join(p + s for p, s in zip(parts, seps)).strip() or "x"


def random_rows(n: int, seed: int) -> list[dict]:
    """Chat rows (an optional system turn, one to three exchanges) and prompt/completion
    rows (most completions start with a space, as chat data does), about half each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            messages = [{"role": "system", "content": content(rng)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": content(rng)},
                             {"role": "assistant", "content": content(rng)}]
            rows.append({"messages": messages})
        else:
            space = " " if rng.random() < 0.8 else ""
            rows.append({"prompt": content(rng), "completion": space + content(rng)})
    return rows


def training_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [content(rng, rare=False) for _ in range(n)]


def _specials(algorithm: str) -> list[str]:
    sp = ["<unk>", "<s>"] if algorithm != "byte_bpe" else []
    return [*sp, *ROLE_TOKENS, "</s>", "<pad>"]


def _with_bytes(tok, fallback_score: float | None = None):
    """The tokenizer with the 256 '<0xNN>' pieces added and byte fallback on (the trainers
    cannot add them themselves)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model["type"] == "Unigram":
        have = {p for p, _ in model["vocab"]}
        model["vocab"] += [[f"<0x{b:02X}>", fallback_score] for b in range(256) if f"<0x{b:02X}>" not in have]
    else:
        for b in range(256):
            model["vocab"].setdefault(f"<0x{b:02X}>", len(model["vocab"]))
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


@lru_cache(maxsize=None)
def _trained(kind: str) -> str:
    """The trained tokenizer of `kind`, as tokenizer.json text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    algorithm, size = KINDS[kind]
    specials = _specials(algorithm)
    text = training_corpus()
    if algorithm == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok.to_str()
    newline = pre_tokenizers.Split(Regex("\n"), behavior="isolated")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    if algorithm == "sp_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([newline, metaspace,
                                                     pre_tokenizers.Digits(individual_digits=True)])
        counts: dict[str, int] = {}
        for line in text:
            for ch in line.replace(" ", "▁"):
                counts[ch] = counts.get(ch, 0) + 1
        alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:60]  # ties by character: reproducible
        tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                          initial_alphabet=alphabet, limit_alphabet=60))
        tok = _with_bytes(tok)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence([newline, metaspace])
        tok.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=size, special_tokens=specials,
                                                              unk_token="<unk>", shrinking_factor=0.75))
        tok = _with_bytes(tok, fallback_score=-30.0)
    tok.decoder = decoder
    return tok.to_str()


def make_tokenizer(kind: str, template: str):
    """A transformers fast tokenizer of `kind` carrying `template` (its EOS is the template's)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    algorithm = KINDS[kind][0]
    jinja, eos = TEMPLATES[template]
    named = {"eos_token": eos, "pad_token": "<pad>"}
    if algorithm != "byte_bpe":
        named.update(bos_token="<s>", unk_token="<unk>")
    extra = [t for t in ROLE_TOKENS if t != eos]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(kind)), extra_special_tokens=extra,
                                   **named)
    fast.chat_template = jinja
    return fast
