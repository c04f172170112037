"""The three sets of shipped models as tasks for scripts.model_maker: `TINY` (hpd/assets/tiny),
`SUMS` (hpd/assets/sums) and `SUMS4` (hpd/assets/sums4). A task writes its data, gives its
tokenizer, the rows each model trains on, what is measured on the saved weights and the
model card; the maker does the rest."""

from __future__ import annotations

import random
from functools import partial

import torch

from hpd.tasks import arith, sums, sums4
from hpd.tasks.sums_models import generate_texts, score, style_probabilities
from hpd.tasks.sums_recovery import continuation_rows
from hpd.tasks.sums_recovery import measure as recovery_measure
from hpd.tasks.tiny import encode_example, greedy_accuracy
from scripts.model_maker import MAX_POSITIONS, REPO, Prepared, Task, build_tokenizer, log

SEED = 0


def _spec(arch: tuple, steps: int, warmup: int, seed: int) -> dict:
    hidden, mlp, layers, heads = arch
    return dict(arch=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                          num_attention_heads=heads),
                train=dict(steps=steps, batch_size=64, lr=2e-3, warmup=warmup, weight_decay=0.01, seed=seed))


def pct(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def _architecture(spec: dict, n_params: int, size_mb: float) -> str:
    a = spec["arch"]
    return (f"- Architecture: `LlamaForCausalLM`, {a['num_hidden_layers']} layers, hidden {a['hidden_size']},\n"
            f"  {a['num_attention_heads']} heads, MLP {a['intermediate_size']}, tied embeddings, "
            f"{MAX_POSITIONS} positions.\n"
            f"- Parameters: {n_params:,} ({size_mb:.2f} MB of float32 safetensors).")


# ---------------------------------------------------------------- tiny: arithmetic word problems

TINY_N_POOL = 20000  # distinct training problems the teacher learns from
TINY_N_SHIPPED = 4000  # of them, shipped as train.jsonl (the distillation prompts)
TINY_N_HELD = 200
TINY_EVAL_FIRST = 40  # the tests re-measure the teacher on the first rows of held.jsonl


def _prepare_tiny(out) -> Prepared:
    difficulty = dict(arith.DEFAULTS)
    pool, held = arith.make_split(SEED, TINY_N_POOL, TINY_N_HELD, **difficulty)
    shipped = pool[:TINY_N_SHIPPED]
    arith.write_jsonl(shipped, out / "train.jsonl")
    arith.write_jsonl(held, out / "held.jsonl")
    log(f"data: {len(pool)} training problems ({len(shipped)} shipped), {len(held)} held out")
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in pool], out / "_tokenizer")
    lengths = [len(encode_example(tok, r["prompt"], r["completion"])[0]) for r in pool]
    log(f"tokenizer: {len(tok)} tokens; sequence length max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}")
    summary = {"seed": SEED, "difficulty": difficulty, "vocab_size": len(tok), "n_train_pool": TINY_N_POOL,
               "n_train_shipped": TINY_N_SHIPPED, "n_held": TINY_N_HELD, "eval_first": TINY_EVAL_FIRST}
    notes = {"teacher": f"{TINY_N_POOL} distinct training problems (the first {TINY_N_SHIPPED} are `train.jsonl`)",
             "student": f"the {TINY_N_SHIPPED} problems of `train.jsonl`, briefly, so that distillation has room "
                        "to help"}
    return Prepared(tok, {"teacher": pool, "student": shipped}, notes, summary, held, scratch=out / "_tokenizer")


def _measure_tiny(name, model, tok, prepared: Prepared) -> dict:
    return {"held_accuracy": greedy_accuracy(model, tok, prepared.held),
            f"held_accuracy_first{TINY_EVAL_FIRST}": greedy_accuracy(model, tok, prepared.held[:TINY_EVAL_FIRST])}


def _card_tiny(name, spec, n_params, size_mb, t, m, vocab, note) -> str:
    a = spec["arch"]
    return f"""# hpd tiny {name}

The {name} of hpd's embedded arithmetic demo. Made offline by
`scripts/make_tiny_models.py` (seed {SEED}); nothing was downloaded.

- Architecture: `LlamaForCausalLM`, {a['num_hidden_layers']} layers, hidden {a['hidden_size']},
  {a['num_attention_heads']} heads (head dim {a['hidden_size'] // a['num_attention_heads']}),
  MLP {a['intermediate_size']}, tied embeddings, RoPE theta 10000, {MAX_POSITIONS} positions.
- Parameters: {n_params:,} ({size_mb:.2f} MB of float32 safetensors).
- Tokenizer: byte-level BPE with single digits, {vocab} tokens, trained on the task text;
  `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3.
- Training: from scratch, AdamW (lr {t['lr']}, betas 0.9/0.98, weight decay
  {t['weight_decay']}, warmup {t['warmup']} then cosine to 10%),
  {t['steps']} steps of batch {t['batch_size']}, torch seed {t['seed']},
  final training loss {t['final_loss']} ({t['seconds']:.0f} s on 2 CPU threads).
- Data: {note}.
- Sequence format: `[bos] + prompt + completion + [eos]`; loss on the completion and eos.

## Held-out exact match

Greedy decoding from `[bos] + prompt` until eos (at most 64 new tokens), answer taken from
the last `Answer: N` line, measured on these saved weights:

- all {TINY_N_HELD} rows of `held.jsonl`: **{m['held_accuracy']:.3f}**
- first {TINY_EVAL_FIRST} rows: {m[f'held_accuracy_first{TINY_EVAL_FIRST}']:.3f}

For demos and tests only; it knows nothing beyond this task.
"""


TINY = Task(
    name="tiny",
    out=REPO / "hpd" / "assets" / "tiny",
    specs={"teacher": _spec((128, 384, 4, 4), steps=900, warmup=60, seed=SEED + 1),
           "student": _spec((64, 192, 2, 2), steps=520, warmup=30, seed=SEED + 2)},
    prepare=_prepare_tiny, measure=_measure_tiny,
    describe=lambda m: (f"held-out exact match {m['held_accuracy']:.3f} "
                        f"(first {TINY_EVAL_FIRST}: {m[f'held_accuracy_first{TINY_EVAL_FIRST}']:.3f})"),
    card=_card_tiny, export_rows=lambda prepared: prepared.held[:32],
    probe=lambda m, tok, prepared: (f"held-out exact match (first 100): "
                                    f"{greedy_accuracy(m, tok, prepared.held[:100]):.2f}"),
)


# ---------------------------------------------------------------- sums and sums4: long working, three styles


def _style_rows(pool: list, mix: dict, rng) -> list:
    return [p.row(sums.pick_style(rng, mix)) for p in pool]


def measure_sums(model, tok, problems, *, samples: int, max_new_tokens: int, style_rows: int,
                 sample_rows: int = 0, eval_first: int = 0, openings: bool = False) -> dict:
    """Greedy and sampled (T=1, seeded) exact match against the pairs-style references, the styles
    of the answers, and each style's mean probability of its full correct answer."""
    prompts, refs = [p.prompt() for p in problems], [p.completion("pairs") for p in problems]
    greedy = score(prompts, refs, generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens))
    torch.manual_seed(SEED + 20)
    n = sample_rows or len(prompts)
    sampled = score(prompts[:n], refs[:n], generate_texts(model, tok, prompts[:n], greedy=False, samples=samples,
                                                          max_new_tokens=max_new_tokens), samples=samples)
    out = {"greedy_accuracy": greedy["accuracy"]}
    if eval_first:  # the tests re-measure the teacher's greedy accuracy on the first rows
        first = score(prompts[:eval_first], refs[:eval_first],
                      generate_texts(model, tok, prompts[:eval_first], max_new_tokens=max_new_tokens))
        out[f"greedy_accuracy_first{eval_first}"] = first["accuracy"]
    out.update(sampled_accuracy=sampled["accuracy"], greedy_styles=greedy["styles"])
    if openings:
        out["greedy_openings"] = greedy["openings"]
    out["sampled_styles"] = sampled["styles"]
    out[f"style_probability_first{style_rows}"] = style_probabilities(model, tok, problems[:style_rows])
    return out


def teacher_answers(model, tok, problems, seed: int, max_new_tokens: int) -> list:
    """The teacher's own sampled (T=1) answer to each problem's prompt, as rows."""
    torch.manual_seed(seed)
    prompts = [p.prompt() for p in problems]
    texts = generate_texts(model, tok, prompts, greedy=False, max_new_tokens=max_new_tokens)
    return [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]


def _card_sums(name, spec, n_params, size_mb, t, m, vocab, note, *, title, intro, tokenizer, scores) -> str:
    return f"""# hpd {title} {name}

{intro.format(name=name, seed=SEED)}

{_architecture(spec, n_params, size_mb)}
- Tokenizer: {tokenizer.format(vocab=vocab)}
- Training: from scratch, AdamW (lr {t['lr']}, warmup {t['warmup']} then cosine to 10%), {t['steps']} steps
  of batch {t['batch_size']}, torch seed {t['seed']}, final training loss {t['final_loss']}.
- Data: {note}.

{scores(m)}

For demos, tests and benchmarks only; it knows nothing beyond this task.
"""


def _describe_sums(m: dict) -> str:
    probs = next(v for k, v in m.items() if k.startswith("style_probability_first"))
    return (f"greedy {m['greedy_accuracy']:.3f}, sampled {m['sampled_accuracy']:.3f}; greedy styles "
            f"{pct(m['greedy_styles'])}; style probabilities {pct(probs)}")


def _probe_sums(model, tok, prepared: Prepared, max_new_tokens: int) -> str:
    problems = prepared.held["test"][:100]
    prompts = [p.prompt() for p in problems]
    r = score(prompts, [p.completion("pairs") for p in problems],
              generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens))
    return f"greedy on the first 100 scored prompts: {r['accuracy']:.2f} styles {pct(r['styles'])}"


def _sums_task(name: str, *, measured: dict, intro: str, tokenizer: str, scores, more=None, **parts) -> Task:
    """A sums-like task: scored on prepared.held["test"] by `measure_sums(**measured)` and by
    `more(name, model, tok, prepared)` where given, with the sums model card (`intro`, the
    `tokenizer` line and the `scores` section)."""
    def measure(name, model, tok, prepared):
        got = measure_sums(model, tok, prepared.held["test"], **measured)
        return {**got, **(more(name, model, tok, prepared) if more else {})}

    return Task(name=name, describe=_describe_sums, measure=measure,
                card=partial(_card_sums, title=name, intro=intro, tokenizer=tokenizer, scores=scores),
                export_rows=lambda prepared: [p.row("forward") for p in prepared.held["test"][:16]],
                probe=partial(_probe_sums, max_new_tokens=measured["max_new_tokens"]), **parts)


# the teacher writes two styles and reads the third; the raw student starts on all three briefly
TEACHER_MIX = {"forward": 0.45, "backward": 0.45, "pairs": 0.10}
STUDENT_MIX = {"forward": 1 / 3, "backward": 1 / 3, "pairs": 1 / 3}
SUMS_N_POOL = 24000  # teacher training problems
SUMS_N_STUDENT = 4000  # student pre-training problems (a separate slice)
SUMS_N_SHIPPED = 3000  # distillation prompts (the first of the teacher's pool), pairs style
SUMS_N_HELD = 200
SUMS_EVAL_FIRST = 50
SUMS_SAMPLES = 4  # sampled answers per held-out prompt for pass@1 at T=1
SUMS_MAX_NEW_TOKENS = 96


def _prepare_sums(out) -> Prepared:
    difficulty = dict(sums.DEFAULTS)
    pool, held = sums.make_split(SEED, SUMS_N_POOL + SUMS_N_STUDENT, SUMS_N_HELD, **difficulty)
    teacher_pool, student_pool = pool[:SUMS_N_POOL], pool[SUMS_N_POOL:]
    style_rng = random.Random(SEED + 10)
    rows = {"teacher": _style_rows(teacher_pool, TEACHER_MIX, style_rng),
            "student": _style_rows(student_pool, STUDENT_MIX, style_rng)}
    sums.write_jsonl([p.row("pairs") for p in teacher_pool[:SUMS_N_SHIPPED]], out / "train.jsonl")
    sums.write_jsonl([p.row("pairs") for p in held], out / "held.jsonl")
    log(f"data: {len(rows['teacher'])} teacher, {len(rows['student'])} student problems, {len(held)} held out")
    # every style's text, so that none is tokenized worse than another
    texts = [p.prompt() + c for p in teacher_pool[:4000] for c in p.completions().values()]
    tok = build_tokenizer(texts, out / "_tokenizer")
    working = {s: min(len(tok.encode(p.completion(s).rsplit("Answer", 1)[0], add_special_tokens=False)) for p in held)
               for s in sums.STYLES}
    seq = [len(encode_example(tok, r["prompt"], r["completion"])[0]) for r in rows["teacher"][:2000]]
    log(f"tokenizer: {len(tok)} tokens; working before the answer, min tokens per style {working}; "
        f"sequence length max {max(seq)}")
    summary = {"seed": SEED, "difficulty": difficulty, "teacher_mix": TEACHER_MIX, "student_mix": STUDENT_MIX,
               "vocab_size": len(tok), "n_teacher_pool": SUMS_N_POOL, "n_student_pool": SUMS_N_STUDENT,
               "n_train_shipped": SUMS_N_SHIPPED, "n_held": SUMS_N_HELD, "eval_first": SUMS_EVAL_FIRST,
               "samples": SUMS_SAMPLES, "max_new_tokens": SUMS_MAX_NEW_TOKENS, "min_working_tokens": working}
    notes = {"teacher": f"{SUMS_N_POOL} problems answered forward / backward / in pairs "
                        f"({TEACHER_MIX['forward']:.0%} / {TEACHER_MIX['backward']:.0%} / {TEACHER_MIX['pairs']:.0%}); "
                        f"the first {SUMS_N_SHIPPED} are the prompts of `train.jsonl`",
             "student": f"{SUMS_N_STUDENT} other problems, a third in each style, briefly, so that it starts weak "
                        "(its greedy answers all open with the forward shape `a: N`)"}
    return Prepared(tok, rows, notes, summary, {"test": held}, scratch=out / "_tokenizer")


def _finish_sums(name, model, tok, prepared: Prepared, out) -> None:
    if name == "teacher":  # its own answers to the held-out prompts: KL on the teacher's text
        sums.write_jsonl(teacher_answers(model, tok, prepared.held["test"], SEED + 30, SUMS_MAX_NEW_TOKENS),
                         out / "held_teacher.jsonl")


def _scores_sums(m: dict) -> str:
    first = m[f"greedy_accuracy_first{SUMS_EVAL_FIRST}"]
    return f"""## Held-out ({SUMS_N_HELD} prompts of `held.jsonl`)

- greedy exact match: **{m['greedy_accuracy']:.3f}** (first {SUMS_EVAL_FIRST} rows: {first:.3f})
- sampled exact match, T=1, {SUMS_SAMPLES} samples per prompt: **{m['sampled_accuracy']:.3f}**
- style of the greedy answers: {pct(m['greedy_styles'])}
- style of the sampled answers: {pct(m['sampled_styles'])}
- mean probability of each style's full correct answer (first 100 prompts): {pct(m['style_probability_first100'])}"""


SUMS = _sums_task(
    "sums", out=REPO / "hpd" / "assets" / "sums",
    specs={"teacher": _spec((128, 320, 3, 4), steps=1200, warmup=60, seed=SEED + 1),
           "student": _spec((48, 128, 2, 2), steps=300, warmup=30, seed=SEED + 2)},
    prepare=_prepare_sums, finish=_finish_sums, scores=_scores_sums,
    measured=dict(samples=SUMS_SAMPLES, max_new_tokens=SUMS_MAX_NEW_TOKENS, style_rows=100, eval_first=SUMS_EVAL_FIRST),
    intro="The {name} of hpd's sums task (docs/when-hpd-helps.md). Made offline by\n"
          "`scripts/make_sums_models.py` (seed {seed}); nothing was downloaded.",
    tokenizer="byte-level BPE with single digits, {vocab} tokens; `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3.",
)


SUMS4_N_TEACHER_POOL = 4000  # teacher training problems; the first SUMS4_N_DATA are the distillation prompts
SUMS4_N_STUDENT_POOL = 1000  # the raw student's brief start (a separate slice)
SUMS4_N_DATA = 2000
SUMS4_N_VAL, SUMS4_N_TEST = 150, 300
SUMS4_SAMPLES = 4  # sampled answers per test prompt, T=1
SUMS4_SAMPLE_ROWS = 100
SUMS4_MAX_NEW_TOKENS = 48  # the longest answer is 42 tokens
SUMS4_RECOVERY_ROWS = 100  # test prompts of the recovery measure (hand-made prefixes; the students' are theirs)


def _prepare_sums4(out) -> Prepared:
    from transformers import AutoTokenizer

    pool, val, test = sums4.make_splits(SEED, SUMS4_N_TEACHER_POOL + SUMS4_N_STUDENT_POOL, SUMS4_N_VAL, SUMS4_N_TEST)
    teacher_pool, student_pool = pool[:SUMS4_N_TEACHER_POOL], pool[SUMS4_N_TEACHER_POOL:]
    style_rng = random.Random(SEED + 10)
    rows = {"teacher": _style_rows(teacher_pool, sums4.TEACHER_MIX, style_rng),
            "student": _style_rows(student_pool, sums4.STUDENT_MIX, style_rng)}
    data = teacher_pool[:SUMS4_N_DATA]
    for split, problems in (("train", data), ("val", val), ("test", test)):
        sums.write_jsonl([p.row("pairs") for p in problems], out / sums4.SPLITS[split])
    log(f"data: {len(rows['teacher'])} teacher, {len(rows['student'])} student problems; {SUMS4_N_DATA} distillation "
        f"rows, {len(val)} validation, {len(test)} test")
    tok = AutoTokenizer.from_pretrained(REPO / "hpd" / "assets" / "sums" / "teacher")  # the same characters
    lengths = {s: [len(tok.encode(p.completion(s), add_special_tokens=False)) for p in test] for s in sums.STYLES}
    working = {s: min(len(tok.encode(p.completion(s).rsplit("Answer", 1)[0], add_special_tokens=False)) for p in test)
               for s in sums.STYLES}
    log(f"tokenizer: {len(tok)} tokens; answer tokens per style {({s: (min(v), max(v)) for s, v in lengths.items()})}; "
        f"working before the answer, min {working}")
    # the expert: the teacher's rows, and as many continuations of mixed-style workings it did not start
    rows["expert"] = rows["teacher"] + continuation_rows(teacher_pool, tok, random.Random(SEED + 40))
    summary = {"seed": SEED, "difficulty": sums4.DIFFICULTY, "teacher_mix": sums4.TEACHER_MIX,
               "student_mix": sums4.STUDENT_MIX, "vocab_size": len(tok), "n_teacher_pool": SUMS4_N_TEACHER_POOL,
               "n_student_pool": SUMS4_N_STUDENT_POOL, "n_data": SUMS4_N_DATA, "n_val": SUMS4_N_VAL,
               "n_test": SUMS4_N_TEST, "samples": SUMS4_SAMPLES, "sample_rows": SUMS4_SAMPLE_ROWS,
               "max_new_tokens": SUMS4_MAX_NEW_TOKENS,
               "answer_tokens": {s: [min(v), max(v)] for s, v in lengths.items()}, "min_working_tokens": working,
               "n_expert_continuations": SUMS4_N_TEACHER_POOL}
    mix = sums4.TEACHER_MIX
    notes = {"teacher": f"{SUMS4_N_TEACHER_POOL} problems answered forward / backward / in pairs "
                        f"({mix['forward']:.0%} / {mix['backward']:.0%} / {mix['pairs']:.0%}); the first {SUMS4_N_DATA} "
                        "are the prompts of `train.jsonl`",
             "student": f"{SUMS4_N_STUDENT_POOL} other problems, a third in each style, briefly, so that it starts "
                        "weak but knows the shapes",
             "expert": f"the teacher's {SUMS4_N_TEACHER_POOL} answers, and the same problems once more as random "
                       "mixed-style workings cut at a random token, each followed by the rest of its line and a "
                       "correct finish, with loss on that continuation only (hpd.tasks.sums_recovery."
                       "continuation_rows): it answers a bare prompt as the teacher does and continues a working "
                       "someone else started"}
    return Prepared(tok, rows, notes, summary, {"test": test, "data": data, "out": out})


def _finish_sums4(name, model, tok, prepared: Prepared, out) -> None:
    if name in ("teacher", "expert"):  # its answers to the test prompts (KL on its text) and to the data's
        sums.write_jsonl(teacher_answers(model, tok, prepared.held["test"], SEED + 30, SUMS4_MAX_NEW_TOKENS),
                         out / sums4.SPLITS[f"test_{name}"])
        sums.write_jsonl(teacher_answers(model, tok, prepared.held["data"], SEED + 31, SUMS4_MAX_NEW_TOKENS),
                         out / sums4.SPLITS[f"train_{name}"])


def _recovery_sums4(name, model, tok, prepared: Prepared) -> dict:
    """The expert's recovery and the shipped teacher's, measured alike (hpd.tasks.sums_recovery.measure)
    on the first SUMS4_RECOVERY_ROWS test prompts and on the students' prefixes where written."""
    if name != "expert":
        return {}
    from transformers import AutoModelForCausalLM

    problems = prepared.held["test"][:SUMS4_RECOVERY_ROWS]
    prefixes = prepared.held["out"] / sums4.SPLITS["prefixes"]
    prefixes = prefixes if prefixes.is_file() else None
    teacher = AutoModelForCausalLM.from_pretrained(prepared.held["out"] / "teacher", dtype=torch.float32).eval()
    return {"recovery": recovery_measure(model, tok, problems, prefixes, max_new_tokens=SUMS4_MAX_NEW_TOKENS),
            "teacher_recovery": recovery_measure(teacher, tok, problems, prefixes,
                                                 max_new_tokens=SUMS4_MAX_NEW_TOKENS)}


def _scores_sums4(m: dict) -> str:
    sampled = m["sampled_accuracy"]
    return f"""## Test set ({SUMS4_N_TEST} prompts of `test.jsonl`)

- greedy exact match: **{m['greedy_accuracy']:.3f}**
- sampled exact match, T=1, {SUMS4_SAMPLES} samples on each of the first {SUMS4_SAMPLE_ROWS} prompts: **{sampled:.3f}**
- style of the greedy answers: {pct(m['greedy_styles'])}
- first line of the greedy answers: {pct(m['greedy_openings'])}
- style of the sampled answers: {pct(m['sampled_styles'])}
- mean probability of each style's full correct answer (first 50 prompts): {pct(m['style_probability_first50'])}"""\
        + _recovery_lines(m)


def _recovery_lines(m: dict) -> str:
    if "recovery" not in m:
        return ""
    ours, theirs = m["recovery"], m["teacher_recovery"]
    lines = ["\n\n## Recovery (hpd/tasks/sums_recovery.py)\n",
             "Greedy continuation of prefixes whose working is still sound, from the first "
             f"{SUMS4_RECOVERY_ROWS} test prompts: the share that ends on the right answer, beside the shipped "
             "teacher's, measured alike.\n",
             f"- own accuracy on those prompts: **{ours['own_accuracy']:.3f}** (the teacher: "
             f"{theirs['own_accuracy']:.3f})",
             f"- hand-made mixed-style prefixes ({ours['hand-made']['prefixes']}): "
             f"**{ours['hand-made']['recovery']:.3f}** (the teacher: {theirs['hand-made']['recovery']:.3f})"]
    if "students" in ours:
        got = ours["students"]
        lines.append(f"- students' prefixes (`prefixes.jsonl`, {got['prefixes']} sound of {got['cut']}): "
                     f"**{got['recovery']:.3f}** (the teacher: {theirs['students']['recovery']:.3f})")
    return "\n".join(lines)


def _student_arch(parser) -> None:
    parser.add_argument("--student-arch", default="", metavar="HIDDEN,MLP,LAYERS,HEADS",
                        help="another student shape (for sizing the student; the default is the shipped one)")


def _apply_student_arch(args, specs: dict) -> None:
    if args.student_arch:
        hidden, mlp, layers, heads = (int(v) for v in args.student_arch.split(","))
        specs["student"]["arch"] = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                        num_attention_heads=heads)


SUMS4 = _sums_task(
    "sums4", out=sums4.SUMS4_DIR,
    specs={"teacher": _spec((96, 256, 3, 4), steps=800, warmup=50, seed=SEED + 1),
           "student": _spec((64, 160, 2, 2), steps=400, warmup=20, seed=SEED + 2),
           "expert": _spec((96, 256, 3, 4), steps=1200, warmup=50, seed=SEED + 3)},
    prepare=_prepare_sums4, finish=_finish_sums4, scores=_scores_sums4, more=_recovery_sums4,
    measured=dict(samples=SUMS4_SAMPLES, max_new_tokens=SUMS4_MAX_NEW_TOKENS, style_rows=50,
                  sample_rows=SUMS4_SAMPLE_ROWS, openings=True),
    intro="The {name} of hpd's four-number sums task (hpd/tasks/sums4.py, docs/evidence.md). Made\n"
          "offline by `scripts/make_sums4_models.py` (seed {seed}); nothing was downloaded.",
    tokenizer="the sums tokenizer (byte-level BPE with single digits), {vocab} tokens.",
    extra_args=_student_arch, apply_args=_apply_student_arch,
)
