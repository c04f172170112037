"""`hpd cache-teacher`: run the teacher once over a data file and keep its top-k log-probs.

The data is read and tokenised exactly as `hpd distill` reads it, so the store's rows
line up with the training batches example by example. The teacher runs on batches of
consecutive examples; per batch only the target positions are projected through its
head, a chunk of positions at a time, so (batch x length x vocabulary) logits are never
formed on the chunked path. A shard is written every `examples_per_shard` examples;
after a kill, `resume=True` continues after the last finished shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpd.data.batches import collate, load_dataset
from hpd.data.examples import IGNORE_INDEX, Dataset, pad_id_of
from hpd.files.digest import sha256_of
from hpd.models.loading import local_or_hub
from hpd.objectives.ops import ops_for
from hpd.teachers.cross import batch_teacher, choose_mode, prepare
from hpd.teachers.live import teacher_source_of
from hpd.teachers.store import (
    FORMAT,
    VERSION,
    Quantizer,
    StoreError,
    bytes_per_position,
    covered,
    default_bits,
    discard_unlisted,
    id_bytes,
    is_store_file,
    read_index,
    write_index,
    write_shard,
)

# Fields a resumed store must share with the run that continues it.
RESUME_FIELDS = ("data_sha256", "tokenizer_vocab_sha256", "chat_template_sha256", "tokens_sha256",
                 "max_length", "temperature", "top_k", "teacher_sha256", "teacher_quantize",
                 "teacher_tokenizer_vocab_sha256", "alignment_sha256")


# ----------------------------------------------------------------------------- provenance


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """sha256 of the vocabulary (with the special-token ids) and of the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad")]
    template = getattr(tokenizer, "chat_template", None)
    return {"tokenizer_vocab_sha256": _digest(json.dumps([vocab, specials])),
            "chat_template_sha256": _digest(json.dumps(template))}


def tokens_sha256(dataset: Dataset) -> str:
    """sha256 of every example's token ids and loss mask, in order: what the rows are keyed by."""
    h = hashlib.sha256()
    for e in dataset.examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.packbits(np.asarray(e.loss_mask, dtype=bool)).tobytes())
        h.update(b"|")
    return h.hexdigest()


def teacher_fingerprint(path: str) -> str:
    """sha256 of the teacher's config.json and its weight files' names and sizes (a local
    folder), or of the hub id."""
    source = local_or_hub(path)
    if not isinstance(source, Path):
        return _digest(f"hub:{source}")
    parts = [(source / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(source.glob("*.safetensors"))]
    return _digest("\n".join(parts))


def data_provenance(data: str, tokenizer, dataset: Dataset, max_length: int) -> dict:
    """What the data side of a run (distill or cache-teacher) must agree on."""
    return {"data_file": str(data), "data_sha256": sha256_of(data), **tokenizer_fingerprint(tokenizer),
            "tokens_sha256": tokens_sha256(dataset), "max_length": int(max_length)}


_MEANING = {"data_sha256": "the data file", "tokenizer_vocab_sha256": "the tokenizer's vocabulary",
            "chat_template_sha256": "the chat template", "tokens_sha256": "the tokenised data",
            "max_length": "--max-length", "temperature": "--temperature", "top_k": "--top-k",
            "teacher_sha256": "the teacher", "teacher_quantize": "--teacher-quantize",
            "teacher_tokenizer_vocab_sha256": "the teacher's tokenizer", "alignment_sha256": "the alignment"}


def first_difference(stored: dict, wanted: dict, fields) -> str | None:
    """'FIELD (what) differs (store: A, here: B)' for the first field that differs, else None."""
    for name in fields:
        if name in wanted and stored.get(name) != wanted[name]:
            return (f"{name} ({_MEANING.get(name, name)}) differs "
                    f"(store: {stored.get(name)!r}, here: {wanted[name]!r})")
    return None


# ----------------------------------------------------------------------------- the output folder


def open_store(out: Path, fresh_index: dict, *, resume: bool, overwrite: bool) -> dict:
    """The index to continue from: a fresh one, or a resumed store's after checking it matches."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if present and resume:
        index = read_index(out)
        diff = first_difference(index["provenance"], fresh_index["provenance"], RESUME_FIELDS)
        if diff is None and index["logprob_bits"] != fresh_index["logprob_bits"]:
            diff = f"logprob_bits differs (store: {index['logprob_bits']}, here: {fresh_index['logprob_bits']})"
        if diff:
            raise StoreError(f"--resume: the store in {out} was written with other settings: {diff}")
        discard_unlisted(out, index)
        return index
    if present and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the store there "
                              "or --overwrite to replace it")
    if present:
        foreign = [n for n in present if not is_store_file(n)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise FileExistsError(f"{out} holds files hpd cache-teacher did not write ({shown}); "
                                  "--overwrite only replaces a teacher store. Choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_index(out, fresh_index)
    return fresh_index


# ----------------------------------------------------------------------------- the teacher pass


def teacher_rows(o, source, targets: np.ndarray, *, vocab: int, top_k: int, temperature: float, chunk: int,
                 to_array: Callable) -> dict[str, np.ndarray]:
    """Top-k ids and log-probs, data log-prob and rest mass at every target position of a
    batch, row-major, from a TeacherSource over the batch (the teacher's forward)."""
    flat = np.flatnonzero(targets.reshape(-1) != IGNORE_INDEX)
    selected = source.select(o, to_array(flat))
    y_all = targets.reshape(-1)[flat]
    parts = {"ids": [], "logprobs": [], "data_logprob": [], "rest_mass": []}
    for start in range(0, len(flat), chunk):
        rows = slice(start, min(start + chunk, len(flat)))
        y = to_array(y_all[rows])
        with o.no_grad():
            lp = selected.log_probs(o, rows, vocab, temperature, selected_dtype(o, source))  # (C, V)
            values, ids = o.top_k(lp, top_k)
            data_lp = o.take(lp, y)
            outside = o.put_along(lp, ids, o.full_like(values, -math.inf))
            rest = o.exp(o.logsumexp(outside)) if top_k < vocab else o.zeros_like(data_lp)
            o.evaluate(values, ids, data_lp, rest)
        for name, x in (("ids", ids), ("logprobs", values), ("data_logprob", data_lp), ("rest_mass", rest)):
            parts[name].append(o.numpy(x))
    return {name: np.concatenate(p) for name, p in parts.items()}


def selected_dtype(o, source):
    """float32 (float64 for a float64 teacher): log-probs are computed at least in float32."""
    source = getattr(source, "inner", source)  # a cross-tokenizer source: the teacher's own
    x = source.hidden if hasattr(source, "hidden") else source.logits
    return o.compute_dtype(x)


@dataclass(frozen=True)
class CacheOptions:
    """How `cache_teacher` writes a store (the `hpd cache-teacher` flags of the same names)."""

    top_k: int = 32  # log-probs kept per position
    max_length: int = 1024  # rows truncated as `hpd distill --max-length` will
    batch_size: int = 8  # sequences per teacher pass
    temperature: float = 1.0
    logprob_bits: int | str = "auto"  # 8, 12, 16, 32, or auto (by the vocabulary's size)
    examples_per_shard: int = 1024  # the unit a resume continues from
    chunk_size: int = 1024  # positions projected through the teacher's head at a time
    teacher_quantize: int = 0  # recorded in the provenance (the model is loaded quantized)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


def new_index(data: str, data_tok, dataset: Dataset, options: CacheOptions, *, vocab: int, teacher_name: str,
              backend_name: str, quantizer: Quantizer, extra: dict | None = None) -> dict:
    """A fresh store's index: what it was written from (its provenance) and its layout."""
    top_k = int(options.top_k)
    provenance = {**data_provenance(data, data_tok, dataset, options.max_length),
                  "temperature": float(options.temperature), "top_k": top_k, "teacher": teacher_name,
                  "teacher_sha256": teacher_fingerprint(teacher_name),
                  "teacher_quantize": int(options.teacher_quantize), "backend": backend_name, **(extra or {})}
    return {"format": FORMAT, "version": VERSION, "provenance": provenance, "top_k": top_k,
            "vocab": int(vocab), "id_bytes": id_bytes(vocab), "logprob_bits": quantizer.bits,
            "logprob_span": quantizer.span if quantizer.bits < 32 else None, "logprob_error_bound": quantizer.bound,
            "bytes_per_position": bytes_per_position(top_k, vocab, quantizer.bits),
            "examples": len(dataset), "positions": 0, "shards": [], "complete": False}


def quantizer_for(options: CacheOptions, vocab: int) -> Quantizer:
    return Quantizer(default_bits(vocab) if options.logprob_bits == "auto" else int(options.logprob_bits))


def write_store(out: Path, dataset: Dataset, index: dict, quantizer: Quantizer, options: CacheOptions,
                teacher_pass: Callable[[dict], dict[str, np.ndarray]], pad_id: int,
                after_shard: Callable[[dict], None] | None = None) -> dict:
    """Run `teacher_pass` (a collated batch -> its rows at every target position, row-major:
    ids, logprobs, data_logprob, rest_mass) over the examples the store does not hold yet,
    writing a shard every `examples_per_shard` examples; returns the final index."""
    from tqdm.auto import tqdm

    start = covered(index)
    bar = tqdm(total=len(dataset), initial=start, desc="cache-teacher", unit="example", disable=not options.progress)
    rows: list[dict] = []
    shard_start, a = start, start
    while a < len(dataset):
        b = min(a + options.batch_size, len(dataset), shard_start + options.examples_per_shard)  # a shard ends a batch
        batch = collate(dataset.examples[a:b], pad_id)
        got = teacher_pass(batch)
        counts = (batch["targets"] != IGNORE_INDEX).sum(axis=1)
        for end, count in zip(np.cumsum(counts), counts):
            rows.append({name: x[end - count:end] for name, x in got.items()})
        bar.update(b - a)
        a = b
        if len(rows) >= options.examples_per_shard or b == len(dataset):
            index = write_shard(out, index, shard_start, rows, quantizer)
            shard_start, rows = b, []
            bar.set_postfix(shards=len(index["shards"]), positions=index["positions"], refresh=False)
            if after_shard is not None:
                after_shard(index)
    bar.close()
    return index


def cache_teacher(backend, teacher, tokenizer, data: str, out: str | Path, options: CacheOptions = CacheOptions(),
                  *, teacher_name: str, student_tokenizer=None, tokenizer_mode: str = "auto",
                  after_shard: Callable[[dict], None] | None = None) -> dict:
    """Write (or continue) the teacher store for `data` in `out`; returns the final index.

    `tokenizer` is the teacher's. With `student_tokenizer` the store is laid out on that
    tokenizer's encoding of the data (the student's, which training must then use); when
    it is another tokenizer (`tokenizer_mode` auto or cross), the teacher's rows are
    paired with its targets and moved to its vocabulary (`hpd.teachers.cross`), and the
    store records the teacher's tokenizer and the alignment's digest."""
    if backend.world_size > 1:  # every process would write the same shards
        raise StoreError("hpd cache-teacher runs in one process; start it without torchrun or mlx.launch")
    data_tok, cross, across = tokenizer if student_tokenizer is None else student_tokenizer, None, {}
    if student_tokenizer is not None and choose_mode(tokenizer_mode, student_tokenizer, tokenizer)[0] == "cross":
        cross = prepare([(data, {})], student_tokenizer, tokenizer, options.max_length)
        across = {"teacher_tokenizer": "cross", "alignment_sha256": cross.digest(), "aligned_share": cross.share,
                  "teacher_tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer)["tokenizer_vocab_sha256"]}
    vocab = len(data_tok) if cross else backend.vocab_size(teacher)  # the ids the rows are over
    if options.top_k > vocab:
        raise StoreError(f"--top-k {options.top_k} is larger than the {'student' if cross else 'teacher'}'s "
                         f"vocabulary ({vocab} tokens)")
    quantizer = quantizer_for(options, vocab)
    dataset = load_dataset(data, data_tok, options.max_length)
    fresh = new_index(data, data_tok, dataset, options, vocab=vocab, teacher_name=teacher_name,
                      backend_name=backend.name, quantizer=quantizer, extra=across)
    index = open_store(Path(out), fresh, resume=options.resume, overwrite=options.overwrite)
    teacher_pass = _model_pass(backend, teacher, cross, vocab, options)
    return write_store(Path(out), dataset, index, quantizer, options, teacher_pass, pad_id_of(data_tok), after_shard)


def _model_pass(backend, teacher, cross, vocab: int, options: CacheOptions) -> Callable[[dict], dict]:
    """A collated batch -> the teacher model's rows at its target positions (its own
    tokens of the batch, aligned back, for a teacher of another tokenizer)."""
    chunked = backend.chunked_blocker(teacher) is None  # else the model's own logits, a batch at a time
    shared: dict = {}  # the cross teacher's vocabulary map, built once

    def to_array(x):
        return backend.to_arrays({"x": np.asarray(x, dtype=np.int64)})["x"]

    def teacher_pass(batch: dict) -> dict:
        if cross is not None:
            targets = backend.to_arrays({"t": batch["targets"]})["t"]
            source = batch_teacher(backend, teacher, cross, batch, targets, vocab=vocab, hidden=chunked, cache=shared)
            o = ops_for(targets)
        else:
            found = backend.forward(teacher, backend.to_arrays(batch), hidden=chunked)
            source = teacher_source_of(found)
            o = ops_for(found.hidden if found.hidden is not None else found.logits)
        return teacher_rows(o, source, batch["targets"], vocab=vocab, top_k=options.top_k,
                            temperature=options.temperature, chunk=options.chunk_size, to_array=to_array)

    return teacher_pass


__all__ = ["CacheOptions", "cache_teacher", "new_index", "quantizer_for", "write_store", "teacher_rows",
           "data_provenance", "tokenizer_fingerprint", "tokens_sha256", "teacher_fingerprint", "first_difference",
           "open_store", "RESUME_FIELDS"]
