"""Two tiny tokenizers over the same text with different vocabularies, built offline.

Cross-tokenizer distillation needs a student and a teacher that cut the same text
differently. Both are trained here on one small corpus (digits, accents, CJK, emoji,
code) so that each pair of conventions hpd must bridge shows up:

  student  byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, 'Ġ' for a
           space), no BOS, specials <s> </s> <pad>.
  teacher  SentencePiece-style BPE ('▁' for a space via Metaspace, digits split one by
           one, '<0xNN>' byte fallback for characters outside its small alphabet), a BOS
           added by its post-processor, specials <|begin|> <|end|> <|pad|>.

Both carry the same chat template, which renders a conversation as plain text (no
special tokens inside), so one conversation gives one string for both tokenizers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat sat on a mat and the dog ran to it café naïve résumé über déjà vu "
         "漢字 日本語 中文 数字 😀 🚀 👍🏽 "
         "answer is what how many plus minus equals").split()
CODE = ("def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n",
        "if a == b: {'k': [1, 2]}\n", "x = y * 3.14  # pi\n")
ALPHABET = "".join(sorted(set("".join(WORDS) + "".join(CODE) + "0123456789 ")))

STUDENT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
TEACHER_SPECIALS = {"bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Lines of words, numbers of 1 to 7 digits and code snippets, deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            if r < 0.2:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif r < 0.27:
                parts.append(rng.choice(CODE))
            else:
                parts.append(rng.choice(WORDS))
        out.append(" ".join(parts))
    return out


def _wrap(tok, specials: dict, folder: Path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def build_student(folder: Path, vocab_size: int = 360):
    """Byte-level BPE: every byte is in the alphabet, so nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(STUDENT_SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return _wrap(tok, STUDENT_SPECIALS, folder)


def build_teacher(folder: Path, vocab_size: int = 160, limit_alphabet: int = 48):
    """Metaspace BPE with single digits and byte fallback.

    The trainer keeps only the `limit_alphabet` most frequent characters (chosen here,
    ties broken by the character: the trainer's own choice among equally frequent ones
    changes from run to run, and so would the vocabulary); the 256
    '<0xNN>' pieces are then added to the trained vocabulary (the trainer cannot add
    them itself) so that the rest (rarer accents, CJK, emoji) falls back to bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    specials = ["<unk>", *TEACHER_SPECIALS.values()]
    counts: dict[str, int] = {}
    for line in corpus():
        for ch in line.replace(" ", "▁"):
            counts[ch] = counts.get(ch, 0) + 1
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:limit_alphabet]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  limit_alphabet=limit_alphabet)
    tok.train_from_iterator(corpus(), trainer)

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = TEACHER_SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return _wrap(tok, TEACHER_SPECIALS, folder)


def make_pair(folder) -> tuple:
    """(student_tokenizer, teacher_tokenizer), saved under folder/student and folder/teacher
    with save_pretrained and loaded back from there."""
    folder = Path(folder)
    return build_student(folder / "student"), build_teacher(folder / "teacher")
