"""A served teacher: a running vLLM OpenAI-compatible server as the run's teacher source.

`--teacher http(s)://HOST:PORT/v1` (or `--teacher NAME=URL`, one of several named
teachers) trains the student from the server's top-k prompt log-probs, with no teacher in
this process. The student's token ids are sent as they are (no text, no re-tokenization),
and each position's row is the store's (`hpd.teachers.prompt_rows`): the top k, the data
token's exact log-prob and the rest mass, completed into a full row by the store's
`reconstruct` (`hpd.teachers.stored.StoreTeacher`), so every method a store serves runs
unchanged.

Before anything loads, `ServedModel.choose_mode` checks that the server answers, which
model it serves, that its tokenizer is the student's (texts tokenized by both through
`/tokenize`, the last id decoded through `/detokenize`), that it allows `--teacher-top-k`
log-probs, and that the temperature is 1 (prompt log-probs are the model's own
distribution). A tokenizer mismatch is refused, or, under `--teacher-tokenizer cross`, the
teacher's tokenizer is loaded from the name the server gives (`/v1/models` root) and the
rows are aligned as for an in-process teacher of another tokenizer (`hpd.teachers.cross`).

The loop's hook (`hpd.teachers.served_hook`) keeps requests for the next steps in flight.
"""

from __future__ import annotations

import numpy as np

from hpd.teachers.served_client import Client, ServerError, TeacherUnavailable

# Texts both tokenizers must cut alike (with a sample of the student's own vocabulary).
PROBES = ("The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ?",
          "  two  spaces,\ttab\nnew line; ünïcödé, 中文, emoji 🙂, code: def f(x): return x**2",
          "Question: what is 12 + 30?\nAnswer: 42")


def vocab_sample(tokenizer, runs: int = 24, width: int = 6) -> list[str]:
    """Runs of consecutive ids spread over the vocabulary, decoded: texts made of its tokens."""
    n = len(tokenizer)
    starts = np.linspace(0, max(n - width, 0), runs).astype(int)
    return [tokenizer.decode(list(range(s, min(s + width, n)))) for s in starts]


class ServedModel:
    """The server behind a URL, as the teacher of a run (checked before training)."""

    def __init__(self, url: str):
        self.url = url
        self.client: Client | None = None
        self.model = ""  # the served model's name
        self.root = ""  # what the server loaded (a hub id or its folder)
        self.max_model_len = 0
        self.top_k = 0

    def connect(self, cfg) -> None:
        self.client = Client(self.url, timeout=cfg.teacher_timeout, retries=cfg.teacher_retries)
        try:
            cards = self.client.call("/models", retries=0).get("data") or []  # refused: say so at once
        except TeacherUnavailable as e:
            raise ServerError(f"{e}; start the server (python -m vllm.entrypoints.openai.api_server --model ...) "
                              "or check the URL") from None
        names = [c.get("id") for c in cards]
        wanted = self.client.model
        if wanted and wanted not in names:
            raise ServerError(f"teacher server {self.url} serves {', '.join(names) or 'no model'}, not {wanted!r}")
        if not wanted and len(cards) != 1:
            raise ServerError(f"teacher server {self.url} serves {len(cards)} models ({', '.join(names)}); "
                              "name one: --teacher 'http://HOST:PORT/v1?model=NAME'")
        card = next(c for c in cards if not wanted or c.get("id") == wanted)
        self.model, self.root = card["id"], card.get("root") or card["id"]
        self.max_model_len = int(card.get("max_model_len") or 0)
        self.top_k = int(cfg.teacher_top_k)

    def choose_mode(self, cfg, backend, tokenizer):
        """(mode, why, the teacher's tokenizer or None): same when the server's tokenizer is
        the student's; cross, under --teacher-tokenizer cross, with the teacher's own loaded."""
        if abs(float(cfg.temperature) - 1.0) > 1e-9:
            raise ServerError(f"--temperature {cfg.temperature}: a served teacher gives its log-probs at "
                              "temperature 1 (vLLM's prompt log-probs are the model's own distribution); use "
                              "--temperature 1, or an in-process teacher")
        if int(cfg.teacher_top_k) > len(tokenizer):
            raise ServerError(f"--teacher-top-k {cfg.teacher_top_k} is larger than the vocabulary "
                              f"({len(tokenizer)} tokens)")
        self.connect(cfg)
        self._check_top_k()
        differs = self.tokenizer_difference(tokenizer)
        if differs is None:
            asked = " (the vocabularies are equal: every token is shared)" if cfg.teacher_tokenizer == "cross" else ""
            return "same", f"the server's tokenizer is the student's{asked}", None
        if cfg.teacher_tokenizer != "cross":
            raise ServerError(f"teacher server {self.url} ({self.model}) does not use the student's tokenizer: "
                              f"{differs}; serve a teacher of the student's tokenizer, or pass "
                              "--teacher-tokenizer cross to align the two")
        try:
            teacher_tok = backend.load_tokenizer(self.root)
        except (OSError, ValueError) as e:
            raise ServerError(f"--teacher-tokenizer cross needs the served teacher's tokenizer here, loaded from "
                              f"{self.root!r} (the server's /v1/models root), which failed: {e}") from None
        mismatch = self.tokenizer_difference(teacher_tok)
        if mismatch is not None:
            raise ServerError(f"the tokenizer loaded from {self.root!r} is not the one teacher server {self.url} "
                              f"uses: {mismatch}")
        return "cross", f"as asked: the server's tokenizer differs from the student's ({differs})", teacher_tok

    def _check_top_k(self) -> None:
        """One request as training will send them: the server allows --teacher-top-k log-probs."""
        ids = self.client.call("/tokenize", {"model": self.model, "prompt": "a b c", "add_special_tokens": False},
                               api=False, retries=1)["tokens"]
        ids = (list(ids) * 2)[:4]  # two tokens at least: one position to score
        try:
            self.client.prompt_logprobs(self.model, [ids], self.top_k, retries=1)
        except ServerError as e:
            raise ServerError(f"{e} (--teacher-top-k {self.top_k}: start the server with --max-logprobs "
                              f"{self.top_k} or more, or lower --teacher-top-k)") from None

    def tokenizer_difference(self, tokenizer) -> str | None:
        """Where the server's tokenizer and `tokenizer` differ, or None where they agree."""
        for text in (*PROBES, *vocab_sample(tokenizer), " ".join(tokenizer.all_special_tokens)):
            mine = tokenizer.encode(text, add_special_tokens=False)
            served = self.client.call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False},
                                      api=False, retries=1)["tokens"]
            if list(served) != list(mine):
                return f"{text[:40]!r} is {len(served)} tokens there, {len(mine)} here" if len(served) != len(mine) \
                    else f"{text[:40]!r} gets other ids there"
        last = len(tokenizer) - 1
        served = self.client.call("/detokenize", {"model": self.model, "tokens": [last]}, api=False, retries=1)
        if served.get("prompt") != tokenizer.decode([last]):
            return (f"id {last} (the last here) decodes to {served.get('prompt')!r} there, "
                    f"{tokenizer.decode([last])!r} here")
        return None

    def check_lengths(self, longest: int, what: str) -> None:
        """A sequence of n tokens is scored with one more generated: it needs max_model_len > n."""
        if self.max_model_len and longest >= self.max_model_len:
            raise ServerError(f"{what} are up to {longest} tokens long, and teacher server {self.url} takes at most "
                              f"{self.max_model_len - 1} (its --max-model-len {self.max_model_len}, less one token "
                              f"it must generate): start it with --max-model-len {longest + 1}, or lower --max-length")

    def check_data(self, cfg, data, cross, data_rows: bool = True) -> None:
        """Before training: every row of the data fits the server (in the teacher's tokens across
        tokenizers; `data_rows` False: a store scores them), and so do student rollouts where
        the schedule has them."""
        from hpd.teachers.stored import on_policy_share

        if cross is not None:
            longest = max((len(p.teacher_ids) for p in cross.examples.values()), default=0)
            self.check_lengths(longest, "the data's rows in the teacher's tokens")
        elif data_rows:
            self.check_lengths(max((len(e.input_ids) for e in data.examples), default=0), "the data's rows")
        if on_policy_share(cfg):
            self.check_lengths(int(cfg.max_length), "student rollouts (--max-length)")

    def describe(self) -> str:
        return f"{self.model} served at {self.url} (top-{self.top_k})"


__all__ = ["ServedModel", "PROBES", "vocab_sample"]
