"""The loop's `teacher_source` hook for a served teacher: rows from the server, fetched ahead.

Each micro-batch is one request: its sequences' token ids (the teacher's own under
`--teacher-tokenizer cross`), `prompt_logprobs=k`. With `--teacher-prefetch D`, the hook
peeks at the next D steps' micro-batches (`Batches.peek`; steps the schedule spends on
student rollouts are skipped, their batches do not exist yet) and sends their requests on
threads of their own, so that the server works while the student trains; a step then waits
only for what is not back yet. That wait is logged as `teacher/wait_s`, and the retries a
step saw as `teacher/retries`.

A request that fails for good (the server stays down past its retries, or refuses)
never yields a row: the step's micro-batches are put back (`Batches.rewind`), a checkpoint
of the last finished step is written through the run's own `save`, and the run stops with
one line saying what happened; `--resume` then trains the same steps on the same batches.
Under torchrun each rank sends its own requests, and all ranks stop together.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np

from hpd.teachers.cross import CrossData, CrossTeacher, gather_map, teacher_batch
from hpd.teachers.prompt_rows import json_rows, lay_out, prompts_of, segments
from hpd.teachers.served_client import ServerError, TeacherUnavailable
from hpd.teachers.stored import StoreTeacher


class Pending:
    """One request on a daemon thread (a run that stops does not wait for its retries)."""

    def __init__(self, fetch, prompts):
        self._done = threading.Event()
        self._value, self._error = None, None
        threading.Thread(target=self._run, args=(fetch, prompts), daemon=True).start()

    def _run(self, fetch, prompts) -> None:
        try:
            self._value = fetch(prompts)
        except BaseException as e:  # handed to the step that needs the rows
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class Request:
    batch: dict  # the token ids sent: the micro-batch, or its teacher tokens
    spans: list  # (flat start, length) of each sequence
    prompts: list
    key: bytes
    where: np.ndarray | None = None  # cross: each student position's teacher position


class Measured:
    """A source and the figures of how it was fetched (the loss reports a source's metrics())."""

    def __init__(self, source, figures: dict[str, float]):
        self.source, self.figures = source, figures

    def __getattr__(self, name):
        if name == "source":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def metrics(self) -> dict[str, float]:
        inner = getattr(self.source, "metrics", None)
        return {**(inner() if inner is not None else {}), **self.figures}


class ServedHook:
    def __init__(self, served, *, depth: int, cross: CrossData | None = None):
        """served: the checked hpd.teachers.served.ServedModel; depth: steps sent ahead."""
        self.served, self.client = served, served.client
        self.depth, self.cross = int(depth), cross
        self.k = served.top_k
        # the teacher's vocabulary as far as it is known here (an id beyond it widens a batch's
        # rows): its tokenizer's across tokenizers, else the loop's (the student's), at the first call
        self.vocab = len(cross.teacher_tok) if cross is not None else None
        self.inflight: dict[bytes, tuple[int, Pending]] = {}
        self._planned = -1  # the step whose following steps were last sent
        self._gather = None

    def _request(self, micro_batch: dict) -> Request:
        where = None
        if self.cross is not None:
            tok = self.cross.teacher_tok
            t = teacher_batch(self.cross, micro_batch, tok.pad_token_id if tok.pad_token_id is not None
                              else tok.eos_token_id)
            batch, where = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}, t["where"]
        else:
            batch = micro_batch
        spans = segments(batch)
        prompts = prompts_of(batch, spans)
        h = hashlib.blake2b(digest_size=16)
        for p in prompts:
            h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
        return Request(batch, spans, prompts, h.digest(), where)

    def _rows(self, prompts: list[list[int]]) -> list[dict]:
        if not prompts:
            return []
        answers = self.client.prompt_logprobs(self.served.model, prompts, self.k)
        try:
            return [json_rows(a, p, self.k, self.vocab) for a, p in zip(answers, prompts)]
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # an answer of another shape: no row from it
            raise TeacherUnavailable(f"teacher server {self.client.url} answered with rows that cannot be read "
                                     f"({type(e).__name__}: {e})") from None

    def __call__(self, loop, micro_batch: dict, arrays: dict, plan):
        if self.vocab is None:
            self.vocab = int(loop.vocab)
        request = self._request(micro_batch)
        started, failure, fetched = time.perf_counter(), None, None
        try:
            pending = self.inflight.pop(request.key, None)
            fetched = pending[1].result() if pending is not None else self._rows(request.prompts)
        except (TeacherUnavailable, ServerError) as e:
            failure = e
        wait = time.perf_counter() - started
        if loop.backend.world_size > 1:  # every rank stops where one cannot go on
            if loop.backend.all_reduce_sum(float(failure is not None)) > 0 and failure is None:
                failure = TeacherUnavailable("another process lost its teacher server")
        if failure is not None:
            self._stop(loop, plan, failure)
        if plan is not None:
            self._send_ahead(loop)
        figures = {"teacher/wait_s": wait, "teacher/retries": float(self.client.take_retries())}
        return Measured(self._source(loop, request, fetched, arrays), figures)

    def _source(self, loop, request: Request, fetched: list[dict], arrays: dict):
        rows = lay_out(request.batch, request.spans, fetched, self.k)
        vocab = max(self.vocab, int(rows["ids"].max()) + 1 if rows["ids"].size else 0)
        store = StoreTeacher(loop.backend.to_arrays(rows), vocab=vocab, temperature=1.0)
        if self.cross is None:
            return store
        if self._gather is None:
            self._gather = loop.backend.to_arrays({"g": gather_map(self.cross, loop.vocab, self.vocab)})["g"]
        where = loop.backend.to_arrays({"w": request.where})["w"]
        return CrossTeacher(store, where, self._gather, arrays["targets"], vocab=loop.vocab,
                            teacher_vocab=self.vocab, identical=False)

    def _send_ahead(self, loop) -> None:
        """Requests for the micro-batches of the next `depth` steps, once per step."""
        step = loop.state.step
        if self.depth <= 0 or step == self._planned:
            return
        self._planned = step
        for key in [k for k, (s, _) in self.inflight.items() if s < step]:  # sent for a step already past
            del self.inflight[key]
        g = loop.config.grad_accum
        ahead = min(self.depth, loop.total_steps - step - 1)
        if ahead <= 0:
            return
        for i, micro_batch in enumerate(loop.batches.peek(ahead * g)):
            s = step + 1 + i // g
            if loop.schedule.plan(s).on_policy:  # its batches will be student rollouts
                continue
            request = self._request(micro_batch)
            if request.key not in self.inflight:
                self.inflight[request.key] = (s, Pending(self._rows, request.prompts))

    def _stop(self, loop, plan, failure: Exception) -> None:
        """Checkpoint the last finished step (this step's batches put back) and stop the run."""
        self.close()
        if plan is not None:
            loop.batches.rewind(loop.config.grad_accum)
        loop.save(loop)
        raise type(failure)(f"{failure}; stopped at step {loop.state.step} of {loop.total_steps} with a checkpoint "
                            f"in {loop.config.out}: once the server answers again, run the same command with "
                            "--resume") from None

    def close(self) -> None:
        self.client.closed.set()
        self.inflight.clear()


__all__ = ["ServedHook", "Measured", "Pending"]
