"""`hpd eval`: exact-match accuracy of generations, perplexity, token-level KL to a teacher."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hpd.data.batches import collate, load_dataset
from hpd.data.examples import pad_id_of, prompt_ids
from hpd.objectives.losses import loss

# held-out data from a `datasets` folder or hub id: these splits, in this order, unless one is named
EVAL_SPLITS = ("test", "validation", "train")


def eval_source(cfg) -> dict:
    """How a run's config reads its held-out data (split and column names)."""
    return {"split": getattr(cfg, "eval_data_split", ""), "columns": getattr(cfg, "data_columns", None)}


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text)
    return found[-1] if found else None


def _answer_line(text: str) -> str | None:
    from hpd.tasks.arith import extract_answer

    return extract_answer(text)


def _math_answer(text: str) -> str | None:
    """The last boxed answer, else the last number, in the canonical form of
    `hpd.report.scoring.canonical_answer` (so 1/2, 0.5 and \\frac{1}{2} compare equal)."""
    from hpd.report.scoring import canonical_answer, extract_answer

    answer = extract_answer(text)
    return None if answer is None else canonical_answer(answer)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer": _answer_line,  # the number after the last "Answer:"
    "last-number": _last_number,
    "math": _math_answer,  # the last \boxed{...}, else the last number, normalised (MATH, GSM8K)
    "exact": lambda text: text.strip(),
}
# what `hpd eval` scores generations with: exact match of the extracted answer (greedy, or the
# mean over K samples: pass@1), ROUGE-L against the reference (dialogue), or pass@1 of code
# run against the row's tests in a sandbox (hpd.report.scoring.run_code)
METRICS = ("exact-match", "rouge-l", "code")


def get_extractor(spec: str) -> Callable[[str], str | None]:
    """A named extractor, or `regex:PATTERN` (the first group, else the match, of the last match)."""
    if spec.startswith("regex:"):
        pattern = re.compile(spec[len("regex:"):])

        def extract(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            m = matches[-1]
            return (m.group(1) if m.groups() else m.group(0)).strip()

        return extract
    if spec not in EXTRACTORS:
        raise ValueError(f"unknown extractor {spec!r}; allowed: {', '.join(EXTRACTORS)}, regex:PATTERN")
    return EXTRACTORS[spec]


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return metric


def reference_of(row: dict) -> str:
    if "messages" in row:
        last = row["messages"][-1]
        if last.get("role") != "assistant":
            raise ValueError("the last message must be the assistant's reference answer")
        return last["content"]
    if isinstance(row.get("completion"), str):
        return row["completion"]
    raise ValueError('expected a "completion" or a final assistant message to compare against')


def accuracy(backend, model, tokenizer, data, *, extractor: str = "answer", samples: int = 1,
             max_new_tokens: int = 128, temperature: float = 1.0, batch_size: int = 16,
             limit: int | None = None, progress: bool = True, split: str = "", columns=None,
             metric: str = "exact-match", code_timeout: float = 5.0, code_memory_mb: int = 512) -> dict[str, float]:
    """Scores of generations on held-out rows: greedy when samples == 1, else K samples per row
    at `temperature`. The headline key is `accuracy` (exact match of the extracted answer;
    sampled, it is pass@1 and is reported under that name too), `rouge_l` (0..100) or
    `pass@1` (code: the row's `test` field run after the extracted program)."""
    from hpd.data.sources import read_rows

    check_metric(metric)
    extract = get_extractor(extractor)
    rows = read_rows(data, split=split, columns=columns, default_splits=EVAL_SPLITS)
    rows = rows[:limit] if limit else rows
    prompts, references = [], []
    for where, row in rows:
        try:
            ids, _ = prompt_ids(row, tokenizer)
            references.append(_reference(row, metric, extractor))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        prompts.append(ids)
    texts = _generations(backend, model, tokenizer, prompts, samples=samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, batch_size=batch_size, progress=progress)
    out = {"rows": len(rows), "samples": samples}
    if metric == "rouge-l":
        from hpd.report.scoring import rouge_l

        flat = [t for per_row in texts for t in per_row]
        out["rouge_l"] = rouge_l(flat, [ref for ref in references for _ in range(samples)]) if flat else 0.0
    elif metric == "code":
        from hpd.report.scoring import code_pass_at_1

        out["pass@1"] = code_pass_at_1(texts, references, timeout_s=code_timeout,
                                       memory_mb=code_memory_mb) if texts else 0.0
    else:
        hits = [sum(ref is not None and extract(t) == ref for t in per_row) for per_row, ref in zip(texts, references)]
        out["accuracy"] = sum(hits) / max(len(rows) * samples, 1)
        if samples > 1:
            out["pass@1"] = out["accuracy"]
    return out


def _reference(row: dict, metric: str, extractor: str) -> str | None:
    """What a row's generations are scored against: the extracted answer, the reference text, or
    the tests of a code row. A math reference may be a bare answer, a box or GSM8K's '#### N'."""
    if metric == "code":
        tests = row.get("test", row.get("tests"))
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError('--metric code needs a "test" field with the code that checks a solution '
                             "(asserts, or HumanEval's check(...) call)")
        return tests
    reference = reference_of(row)
    if metric == "rouge-l":
        return reference
    if extractor == "math":
        from hpd.report.scoring import canonical_answer, reference_answer

        return canonical_answer(reference_answer(reference))
    return get_extractor(extractor)(reference)


def _generations(backend, model, tokenizer, prompts, *, samples, max_new_tokens, temperature, batch_size,
                 progress) -> list[list[str]]:
    """`samples` decoded continuations of each prompt (greedy when samples == 1), EOS dropped."""
    from tqdm.auto import tqdm

    jobs = [i for i in range(len(prompts)) for _ in range(samples)]
    texts: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(jobs), desc="eval", unit="gen", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            gens = backend.generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=1.0, top_k=0, greedy=samples == 1)
            for i, gen in zip(chunk, gens):
                texts[i].append(tokenizer.decode([t for t in gen if t != tokenizer.eos_token_id],
                                                 skip_special_tokens=True))
            bar.update(len(chunk))
    return texts


def likelihood(backend, model, tokenizer, data, *, teacher=None, batch_size: int = 16,
               max_length: int = 1024, limit: int | None = None, split: str = "",
               columns=None, teachers: dict | None = None, route=None) -> dict[str, float]:
    """Per-token NLL and perplexity on the data's targets; KL(teacher || model) when a teacher is
    given. `teachers` {name: model} with `route` (hpd.data.routing.Route): each row's KL to the
    teacher it names, reported per teacher as kl_to_teacher/<name> (and over all rows).
    `limit` keeps the first N usable rows, as `accuracy` does."""

    dataset = load_dataset(data, tokenizer, max_length, split=split, columns=columns,
                           default_splits=EVAL_SPLITS, route=route if teachers else None)
    examples = dataset.examples[:limit] if limit else dataset.examples
    if teachers:
        groups = [(name, teachers[name], [e for e in examples if e.route == k]) for k, name in enumerate(route.names)]
    else:
        groups = [(None, teacher, examples)]
    means, out = MetricMeans(), {}
    for name, reference_model, rows in groups:
        own = MetricMeans()
        for i in range(0, len(rows), batch_size):
            batch = backend.to_arrays(collate(rows[i:i + batch_size], pad_id_of(tokenizer)))
            logits = backend.forward(model, batch).logits
            reference = backend.forward(reference_model, batch).logits if reference_model is not None else logits
            _, m = loss("fkl", logits, reference, batch["targets"])
            means.add(m, m["tokens"])
            own.add(m, m["tokens"])
        if name is not None:
            mine = own.result()
            out[f"kl_to_teacher/{name}"] = mine.get("fkl", float("nan"))
            out[f"tokens/{name}"] = int(mine.get("tokens", 0))
    r = means.result()
    result = {"nll": r["nll"], "perplexity": math.exp(min(r["nll"], 700.0)), "tokens": int(r["tokens"])}
    if teacher is not None or teachers:
        result["kl_to_teacher"] = r["fkl"]
    return {**result, **out}


@dataclass
class MetricMeans:
    """Token-weighted means of per-micro-batch metrics (min/max kept as such).

    Counts (a key ending in `tokens` or `rows`) are summed. A metric "P/x" beside a count
    "P/tokens" is a mean over those tokens (a teacher's own positions, teacher/<name>/kl),
    weighted by them; any other by the micro-batch's tokens. A count "P/rows" beside the
    total "rows" also gives "P/share", its fraction of the rows."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        for k, v in metrics.items():
            if k.endswith(("tokens", "rows")):
                self.sums[k] = self.sums.get(k, 0.0) + v
            elif k.endswith("_min"):
                self.sums[k] = min(self.sums.get(k, v), v)
            elif k.endswith("_max"):
                self.sums[k] = max(self.sums.get(k, v), v)
            else:
                w = metrics.get(k.rsplit("/", 1)[0] + "/tokens", tokens) if "/" in k else tokens
                self.sums[k] = self.sums.get(k, 0.0) + v * w
                self.weights[k] = self.weights.get(k, 0.0) + w

    def result(self) -> dict[str, float]:
        out = {k: (v if k.endswith(("tokens", "rows", "_min", "_max")) else v / max(self.weights[k], 1.0))
               for k, v in self.sums.items()}
        for k, v in self.sums.items():
            if k.endswith("/rows") and self.sums.get("rows"):
                out[k[: -len("rows")] + "share"] = v / self.sums["rows"]
        return out
