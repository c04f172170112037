"""One teacher of a run: which source gives its log-probs, set up before training starts.

A run's teacher is a model that reads the student's tokens (`hpd.teachers.live`), a model of
another tokenizer (`hpd.teachers.cross`), a vLLM server named by its URL (`hpd.teachers.served`),
an offline store (`hpd.teachers.stored`), or a store with a model (or a server) beside it for the
steps the store cannot score. `choose_mode` and `check_data`
check everything that can be checked before any model loads (the tokenizers, every row's
pairing, the store's provenance); `load` loads the model. The loop then asks `hook` for each
batch's source and never learns which it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpd.teachers.cross import CrossData, choose_mode, cross_source, prepare_for_run
from hpd.teachers.live import live_source
from hpd.teachers.served_client import is_url


@dataclass
class RunTeacher:
    path: str  # the teacher model ("" for a store alone)
    cache: str = ""  # its store (hpd cache-teacher), if the run trains from one
    tokenizer: Any = None  # the teacher model's tokenizer
    mode: str = "same"  # "same": it reads the student's ids; "cross": its own (hpd.teachers.cross)
    why: str = ""  # why that mode, for the start line
    cross: CrossData | None = None  # every row paired across the tokenizers
    store: Any = None  # hpd.teachers.store.Store, opened by check_data
    model: Any = None  # set by load()
    keep: Callable | None = None  # the rows it scores, where several teachers share the data (all: None)
    served: Any = None  # hpd.teachers.served.ServedModel where the path is a server's URL
    route = None  # one teacher: rows name none (hpd.teachers.named routes several)
    _cfg = None  # the run's config, kept by load() for the hook

    def __post_init__(self):
        if is_url(self.path):
            from hpd.teachers.served import ServedModel

            self.served = ServedModel(self.path)

    @property
    def name(self) -> str:
        """What the run info and model card name as the teacher."""
        return self.path or self.store.provenance["teacher"]

    @property
    def scores_eval(self) -> bool:
        """Whether held-out batches get a teacher (a store alone scores only its own rows)."""
        return self.model is not None or self.served is not None

    def models(self) -> dict[str, Any]:
        return {"teacher": self.model} if self.model is not None else {}

    def describe(self) -> str:
        """The start line's words on the tokenizers ("" for a store alone)."""
        served = f"; teacher {self.served.describe()}" if self.served is not None else ""
        return f"{served}; teacher tokenizer: {self.mode} ({self.why})" if self.path else ""

    def choose_mode(self, cfg, backend, tokenizer) -> None:
        """The teacher's tokenizer, and whether it reads the student's ids; a refused
        combination stops the run before the data loads."""
        if not self.path:
            return
        if self.served is not None:  # the server's tokenizer, checked through its endpoints
            self.mode, self.why, self.tokenizer = self.served.choose_mode(cfg, backend, tokenizer)
            return
        self.tokenizer = backend.load_tokenizer(self.path)
        try:
            self.mode, self.why = choose_mode(cfg.teacher_tokenizer, tokenizer, self.tokenizer)
        except ValueError as e:
            raise ValueError(f"--teacher-tokenizer {cfg.teacher_tokenizer}: {e}; pass --teacher-tokenizer cross "
                             "(or auto) to distil across tokenizers") from None

    def check_data(self, cfg, tokenizer, data, eval_kwargs: dict, say: Callable[[str], None]) -> None:
        """Before any model loads: every row paired across the tokenizers, a store checked
        against this data, tokenizer and settings; a bad row or a store written for other
        data stops the run here."""
        if self.mode == "cross":
            self.cross = prepare_for_run(cfg, tokenizer, self.tokenizer, eval_kwargs, keep=self.keep)
            say(f"teacher tokenizer: cross: {self.cross.describe()}")
        if self.cache:
            from hpd.teachers.stored import open_for_run

            self.store = open_for_run(cfg, tokenizer, data, cache=self.cache,
                                      teacher="" if self.served is not None else self.path)
        if self.served is not None:
            self.served.check_data(cfg, data, self.cross, data_rows=self.store is None)

    def load(self, backend, cfg, say: Callable[[str], None] = lambda message: None) -> None:
        self._cfg = cfg
        if self.path and self.served is None:
            self.model = backend.load_model(self.path, trainable=False, dtype=cfg.dtype,
                                            quantize=cfg.teacher_quantize)

    def release(self) -> None:
        self.model = None

    def vocab(self, backend, student) -> int:
        """The columns both sides can score: the student's vocabulary and the teacher's
        (the student's own across tokenizers: the teacher's rows are gathered onto it)."""
        if not self.path:
            return min(backend.vocab_size(student), self.store.vocab)
        if self.served is not None:  # the server's model is not here: the student's, or its tokenizer's
            return backend.vocab_size(student)
        return min(backend.vocab_size(student), backend.vocab_size(student if self.cross else self.model))

    def hook(self) -> Callable:
        """The Loop's `teacher_source`: (loop, micro-batch, arrays, plan) -> the batch's
        source, over this teacher's model (read when called: it may be swapped in later)."""
        model_of = lambda: self.model  # noqa: E731
        if self.served is not None:
            from hpd.teachers.served_hook import ServedHook

            live = ServedHook(self.served, depth=self._cfg.teacher_prefetch, cross=self.cross)
        else:
            live = live_source(model_of) if self.cross is None else cross_source(self.cross, model_of)
        if self.store is None:
            return live
        from hpd.teachers.stored import store_source

        return store_source(self.store, live if self.path else None)


__all__ = ["RunTeacher"]
