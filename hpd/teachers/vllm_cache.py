"""`hpd cache-teacher --backend vllm`: the teacher store written from vLLM's prompt log-probs.

The store's index, its folder and its write loop are `hpd.teachers.cache`'s; only the
teacher pass differs: each batch's sequences go to a vLLM engine as token ids with
`prompt_logprobs=k`, and `hpd.teachers.prompt_rows` turns the answer into the same rows
(the top k sorted, the data token's exact log-prob, the rest mass as what the top k
leave). The provenance records the engine and its version beside the usual fields, and a
resume continues as the torch and mlx writers' do.

vLLM's prompt log-probs are the model's own distribution, so the store is written at
temperature 1; and it is laid out on the teacher's own tokenizer (a `--student` of the
same tokenizer is accepted, another is refused: the alignment across tokenizers needs the
teacher's whole rows, which `--backend torch` or `mlx` compute).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpd.data.batches import load_dataset
from hpd.data.examples import IGNORE_INDEX, pad_id_of
from hpd.teachers.cache import CacheOptions, new_index, open_store, quantizer_for, write_store
from hpd.teachers.cross import choose_mode
from hpd.teachers.prompt_rows import ROWS, engine_rows, lay_out, prompts_of, segments
from hpd.teachers.store import StoreError


def model_vocab(path: str) -> int:
    """The teacher's vocabulary (its output head's rows), from its config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return int(config.get_text_config().vocab_size)


def engine_pass(engine, k: int, vocab: int) -> Callable[[dict], dict]:
    """A collated batch -> the engine's rows at its target positions, row-major."""
    from hpd.engines.vllm import import_vllm

    params = import_vllm().SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True,
                                          detokenize=False)

    def teacher_pass(batch: dict) -> dict:
        spans = segments(batch)
        prompts = prompts_of(batch, spans)
        outputs = engine.generate(prompts, params)
        rows = [engine_rows(o.prompt_logprobs, p, k, vocab) for o, p in zip(outputs, prompts)]
        flat = lay_out(batch, spans, rows, k)
        counted = np.asarray(batch["targets"]).reshape(-1) != IGNORE_INDEX
        return {name: flat[name][counted] for name in ROWS}

    return teacher_pass


def _refusals(options: CacheOptions, tokenizer, student_tokenizer, tokenizer_mode: str, vocab: int) -> None:
    if abs(float(options.temperature) - 1.0) > 1e-9:
        raise StoreError(f"--temperature {options.temperature}: vLLM gives prompt log-probs at temperature 1 only "
                         "(the model's own distribution); cache at --temperature 1, or use --backend torch")
    if student_tokenizer is not None and choose_mode(tokenizer_mode, student_tokenizer, tokenizer)[0] == "cross":
        raise StoreError("--backend vllm writes the store on the teacher's own tokenizer, and this --student's "
                         "differs (aligning across tokenizers needs the teacher's whole rows); use --backend torch "
                         "or mlx for a store across tokenizers")
    if options.top_k > vocab:
        raise StoreError(f"--top-k {options.top_k} is larger than the teacher's vocabulary ({vocab} tokens)")


def cache_teacher_vllm(engine, tokenizer, data: str, out: str | Path, options: CacheOptions | None = None, *,
                       teacher_name: str, student_tokenizer=None, tokenizer_mode: str = "auto",
                       after_shard: Callable[[dict], None] | None = None) -> dict:
    """Write (or continue) the store for `data` in `out` from a vLLM engine; returns the index.

    `engine`: an `hpd.engines.vllm.Engine` on the teacher, or a function (the max_model_len
    the data needs) -> Engine, called only once the data and the output folder are accepted.
    `tokenizer` is the teacher's."""
    from hpd.engines.vllm import import_vllm

    options = CacheOptions() if options is None else options
    vocab = model_vocab(teacher_name)
    _refusals(options, tokenizer, student_tokenizer, tokenizer_mode, vocab)
    data_tok = tokenizer if student_tokenizer is None else student_tokenizer
    dataset = load_dataset(data, data_tok, options.max_length)
    longest = max((len(e.input_ids) for e in dataset.examples), default=1)
    quantizer = quantizer_for(options, vocab)
    fresh = new_index(data, data_tok, dataset, options, vocab=vocab, teacher_name=teacher_name, backend_name="vllm",
                      quantizer=quantizer, extra={"engine": "vllm", "engine_version": import_vllm().__version__})
    out = Path(out)
    fresh_folder = not out.exists() or not any(out.iterdir())
    index = open_store(out, fresh, resume=options.resume, overwrite=options.overwrite)
    try:
        if callable(engine):
            engine = engine(longest + 1)
        if longest >= engine.max_model_len:
            raise StoreError(f"rows of {longest} tokens need the engine's max_model_len above it, and it is "
                             f"{engine.max_model_len}: pass --vllm-arg max_model_len={longest + 1}, or a lower "
                             "--max-length")
    except BaseException:
        if fresh_folder:  # nothing was written but the new index: leave no store behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return write_store(out, dataset, index, quantizer, options, engine_pass(engine, options.top_k, vocab),
                       pad_id_of(data_tok), after_shard)


__all__ = ["cache_teacher_vllm", "engine_pass", "model_vocab"]
