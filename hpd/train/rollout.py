"""Student rollouts and teacher generation, over the backends' `generate`.

A rollout keeps each row's prompt and replaces its target with a sampled continuation;
the loss then covers only generated tokens (prompt tokens and anything after EOS carry
none), and the teacher scores the whole rollout in one forward pass, as any batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpd.data.batches import collate
from hpd.data.examples import IGNORE_INDEX, DataError, Example, pad_id_of, prompt_ids, read_jsonl
from hpd.data.routing import prompt_routes


class RolloutEngineError(RuntimeError):
    """The rollout engine failed; the message is one line that says what to do. The run
    stops on it, mid-run after a checkpoint of the last finished step (hpd.train.run)."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False  # the most likely token at each position (engines compared token for token)


def prompts_of(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """The prompt of every row of a right-padded or packed (hpd.data.packing) batch."""
    if "token_rows" in batch:
        ids, owner = batch["input_ids"], batch["token_rows"]
        return [ids[owner == r][:n].tolist() for r, n in zip(batch["rows"], batch["prompt_lens"])]
    return [row[:n].tolist() for row, n in zip(batch["input_ids"], batch["prompt_lens"])]


def rollout_batch(backend, model, tokenizer, batch: dict[str, np.ndarray], sampling: Sampling,
                  max_length: int, replace: list[bool] | None = None) -> dict[str, np.ndarray]:
    """The batch's prompts continued by `model` through the backend's `generate`; targets are
    the generated tokens only. With `replace` (a flag per row, in `prompts_of` order), only
    the flagged rows are continued and the others keep their data."""
    prompts = prompts_of(batch)
    asked = [p for p, r in zip(prompts, _flags(replace, len(prompts))) if r]
    generated = _backend_generate(backend, model, tokenizer, asked, sampling) if asked else []
    return rollout_examples(batch, prompts, generated, tokenizer, max_length, replace)


def _flags(replace: list[bool] | None, n: int) -> list[bool]:
    return [True] * n if replace is None else [bool(r) for r in replace]


def rollout_examples(batch: dict[str, np.ndarray], prompts: list[list[int]], generated: list[list[int]],
                     tokenizer, max_length: int, replace: list[bool] | None = None) -> dict[str, np.ndarray]:
    """The rollout batch of `batch`'s rows: each flagged prompt (every one without `replace`)
    and its continuation from `generated`, in order (cut at max_length), the continuation its
    only targets; an unflagged row keeps its data (prompt, completion and targets). Collated
    as `batch` was."""
    replace = _flags(replace, len(prompts))
    routes = prompt_routes(batch) or [-1] * len(prompts)  # a row keeps its teacher (hpd.data.routing)
    kept = data_examples(batch) if not all(replace) else None
    examples, gens = [], iter(generated)
    for i, (prompt, route) in enumerate(zip(prompts, routes)):
        if not replace[i]:
            examples.append(kept[i])
            continue
        gen = list(next(gens))[: max(0, max_length - len(prompt))]
        if not gen:  # nothing to learn from; keep the shapes valid
            gen = [tokenizer.eos_token_id]
        examples.append(Example(prompt + gen, [False] * len(prompt) + [True] * len(gen), len(prompt), route))
    if "token_rows" in batch:  # packed in, packed out
        from hpd.data.packing import collate_packed

        out = collate_packed(examples, pad_id_of(tokenizer), rows=batch["rows"])
    else:
        out = collate(examples, pad_id_of(tokenizer))
        if "rows" in batch:
            out["rows"] = batch["rows"]  # the keys of split-invariant draws stay with their rows
    out["generated_tokens"] = np.asarray(sum(len(g) for g in generated))
    out["generated_rows"] = np.asarray(len(generated))  # rows continued (a packed batch has fewer lines)
    return out


def data_examples(batch: dict[str, np.ndarray]) -> list[Example]:
    """Every row of a right-padded or packed batch as the Example it was collated from."""
    routes = prompt_routes(batch) or [-1] * len(batch["prompt_lens"])
    if "token_rows" in batch:
        owner = batch["token_rows"]
        cols = [(batch["input_ids"][owner == r], batch["targets"][owner == r]) for r in batch["rows"]]
    else:
        lengths = batch["attention_mask"].sum(axis=1)
        cols = [(batch["input_ids"][i, :n], batch["targets"][i, :n]) for i, n in enumerate(lengths)]
    return [Example(ids.tolist(), [False] + [bool(t != IGNORE_INDEX) for t in targets[:-1]], int(n), route)
            for (ids, targets), n, route in zip(cols, batch["prompt_lens"], routes)]


def _backend_generate(backend, model, tokenizer, prompts, sampling: Sampling) -> list[list[int]]:
    return backend.generate(model, tokenizer, prompts, max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            greedy=sampling.greedy)


class BackendRollouts:
    """Rollouts from the training backend's own `generate` (transformers on torch, mlx-lm on
    mlx), drawing from the framework's RNG, whose state checkpoints keep."""

    def __init__(self, name: str = "hf"):
        self.name = name  # what metrics.jsonl calls it: hf (torch) or mlx-lm

    def generate(self, loop, student, prompts: list[list[int]], keys: list[int],
                 sampling: Sampling) -> tuple[list[list[int]], dict[str, float]]:
        return _backend_generate(loop.backend, student, loop.tokenizer, prompts, sampling), {"rollout/sync_s": 0.0}

    def close(self) -> None:
        pass


class Rollouts:
    """The Loop's rollout hook, (loop, student, batch) -> rollout batch, over the rollout
    engine chosen at set-up (`generate(loop, student, prompts, keys, sampling)` ->
    (continuations, metrics), `keys` the prompts' rows in the data order; `close()`). The
    schedule says which rows the rollouts replace (all, unless `rollout_mix: rows`); the
    engine is asked for those only. The rollout batch carries the engine's metrics under
    "rollout_metrics" (hpd.train.loop adds them to the step's record)."""

    def __init__(self, sampling: Sampling, engine=None):
        self.sampling, self.engine = sampling, engine or BackendRollouts()

    def __call__(self, loop, student, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = prompts_of(batch)
        keys = [int(r) for r in batch["rows"]] if "rows" in batch else list(range(len(prompts)))
        replace = loop.schedule.rollout_rows(loop.state.step, keys)
        asked = [(p, k) for p, k, r in zip(prompts, keys, replace) if r]
        generated, metrics = [], {"rollout/sync_s": 0.0}
        if asked:
            generated, metrics = self.engine.generate(loop, student, [p for p, _ in asked], [k for _, k in asked],
                                                      self.sampling)
        elif loop.backend.world_size > 1 and prompts:
            # another process may be generating: this one takes part in the engine's collectives
            # (an FSDP student's gathered forwards, a weight load) with one row whose answer it drops
            _, metrics = self.engine.generate(loop, student, prompts[:1], keys[:1], self.sampling)
        out = rollout_examples(batch, prompts, generated, loop.tokenizer, loop.config.max_length, replace)
        out["rollout_metrics"] = {"rollout/engine": self.engine.name, **metrics}
        return out

    def close(self) -> None:
        self.engine.close()


def make_rollout(sampling: Sampling, engine=None) -> Rollouts:
    """The Loop's rollout hook over `engine` (default: the backend's `generate`)."""
    return Rollouts(sampling, engine)


# ----------------------------------------------------------------------------- hpd generate


def generate_file(backend, model, tokenizer, data: str | Path, out: str | Path, *, samples: int = 1,
                  sampling: Sampling, batch_size: int = 8, greedy: bool = False, progress: bool = True) -> int:
    """Write `samples` responses per prompt row of `data` to `out` as prompt/completion (or messages)
    rows; an interrupted file is resumed without duplicating rows. Returns rows written now."""
    rows = read_jsonl(data)
    jobs = []
    for lineno, row in rows:
        try:
            ids, head = prompt_ids(row, tokenizer)
        except ValueError as e:
            raise DataError(f"{data}:{lineno}: {e}") from None
        jobs.extend((lineno, k, ids, head) for k in range(samples))
    out = Path(out)
    done = _completed(out)
    todo = [j for j in jobs if (j[0], j[1]) not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="generate", unit="row",
               disable=not progress)
    written = 0
    with open(out, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            gens = backend.generate(model, tokenizer, [c[2] for c in chunk], greedy=greedy,
                                    max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p, top_k=sampling.top_k)
            for (lineno, k, _, head), gen in zip(chunk, gens):
                text = tokenizer.decode([t for t in gen if t != tokenizer.eos_token_id], skip_special_tokens=True)
                if isinstance(head, list):
                    record = {"messages": head + [{"role": "assistant", "content": text}]}
                else:
                    record = {"prompt": head, "completion": text}
                record["source"] = {"line": lineno, "sample": k}
                fh.write(json.dumps(record) + "\n")
                written += 1
            fh.flush()
            bar.update(len(chunk))
    bar.close()
    return written


def _completed(out: Path) -> set[tuple[int, int]]:
    """(source line, sample) pairs already in `out`; a torn last line is dropped."""
    if not out.exists():
        return set()
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    done, good = set(), []
    for line in lines:
        try:
            src = json.loads(line)["source"]
            done.add((int(src["line"]), int(src["sample"])))
            good.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # an interrupted write: keep what came before
    out.write_text("".join(good), encoding="utf-8")
    return done


__all__ = ["RolloutEngineError", "Sampling", "Rollouts", "BackendRollouts", "rollout_batch", "rollout_examples",
           "data_examples", "make_rollout", "generate_file", "prompts_of", "prompt_ids"]
