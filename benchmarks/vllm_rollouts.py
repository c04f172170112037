"""Student rollouts on vLLM against transformers' generate, side by side in one process.

    python -m benchmarks.vllm_rollouts [--rounds 3] [--prompts 64] [--new 128] [--threads 2]
        [--steps 3] [--profile] [--memory 1024x8] [--out DIR]

On the shipped tiny student (float32, the CPU), rounds alternating the two engines so that
machine load falls on both alike; a ratio is the median of the rounds' ratios:

1. rollout tokens/s for a batch of --prompts prompts (the tiny task's own) x --new new tokens,
   sampled at temperature 1 (--model WIDTHxLAYERS: of a random Llama of that shape instead):
   - "hpd rollouts": the calls hpd's rollout hook makes (Backend.generate: one left-padded
     batch with a KV cache; StudentEngine.generate: a seed per request), stopping at EOS;
   - "all --new tokens": EOS masked until --new tokens on both sides (min_new_tokens,
     min_tokens), the decode throughput of full-length rollouts;
2. on-policy steps as `hpd distill` runs them (hpd, --prompts rows, rollouts of up to --new
   tokens) with each engine: step seconds, the rollout's share, and the weight sync's share
   (the student's weights loaded into the engine: once per step, the optimizer having stepped).
   At lr 1e-5 the two students stay close, so both engines roll out about the same tokens;
   at the tiny recipe's 2e-3 the students soon drift into rollouts of different lengths;
3. --profile: where one vLLM rollout of the second kind spends its time (cProfile);
4. --memory WIDTHxLAYERS: resident memory of the training process around an engine on a
   random Llama of that shape: `import vllm`, the engine's start, its first weight loads,
   against what the memory plan (hpd.models.memory.engine_parts) counts.

Writes OUT/results.md (and prints it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hpd command does: spinning threads distort timings
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse  # noqa: E402
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import capture_loop, commit, rss_mib

STUDENT, TEACHER, DATA = "hpd:tiny/student", "hpd:tiny/teacher", "hpd:tiny/train.jsonl"


def median_ratio(pairs) -> tuple[float, list[float]]:
    ratios = [b / a for a, b in pairs]
    return statistics.median(ratios), ratios


def setup(args, root: Path):
    """The student (the tiny one, or with --model a random Llama of that shape), its prompts
    and an engine on it whose KV cache holds them all (no preemption)."""
    import torch

    from hpd.backends import get_backend
    from hpd.data.batches import load_dataset
    from hpd.engines.vllm import EngineOptions
    from hpd.engines.vllm_rollouts import StudentEngine
    from hpd.models.loading import asset_path
    from hpd.models.memory import ENGINE_BLOCK, Shape, sequence_kv_bytes

    torch.set_num_threads(args.threads)
    backend = get_backend("torch")
    folder = asset_path(STUDENT)
    if args.model:
        folder = str(build_model(root / "student", *(int(x) for x in args.model.split("x"))))
    tok = backend.load_tokenizer(folder)
    model = backend.load_model(folder, trainable=True, dtype="float32")
    examples = load_dataset(asset_path(DATA), tok, 1024).examples[:args.prompts]
    prompts = [e.input_ids[:e.prompt_len] for e in examples]
    length = 64 + args.new  # the tiny task's prompts are shorter than 64 tokens
    need = sequence_kv_bytes(Shape.from_folder(folder), 4, length, ENGINE_BLOCK["cpu"], args.prompts)
    options = EngineOptions(dtype="float32", max_model_len=length, kv_cache_mb=-(-need // 2**20))
    started = time.perf_counter()
    engine = StudentEngine.start(folder, options, tok.eos_token_id)
    return backend, tok, model, prompts, engine, time.perf_counter() - started


def hf_rollouts(backend, model, tok, prompts, new: int, full: bool) -> int:
    if not full:
        return sum(map(len, backend.generate(model, tok, prompts, max_new_tokens=new)))
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return int(out[:, width:].numel())


def vllm_rollouts(engine, prompts, new: int, full: bool, round_: int) -> int:
    from hpd.objectives.uniforms import keyed_seeds

    seeds = keyed_seeds(0, round_, range(len(prompts))).tolist()
    if not full:
        return sum(map(len, engine.generate(prompts, [new] * len(prompts), seeds=seeds)))
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=new, min_tokens=new, temperature=1.0, seed=s, ignore_eos=True,
                             stop_token_ids=[engine.eos], detokenize=False) for s in seeds]
    return sum(len(o.outputs[0].token_ids) for o in engine.engine.generate(prompts, params))


def throughput(args, backend, model, tok, prompts, engine) -> list[str]:
    student = f"a random Llama {args.model}" if args.model else "tiny student"
    lines = [f"## Rollout tokens/s ({student}, sampled, float32)", "",
             f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, up to {args.new} "
             "new tokens each.", "",
             "| rollouts | HF tokens | HF tok/s (rounds) | vLLM tokens | vLLM tok/s (rounds) | vLLM / HF (rounds) |",
             "|---|---:|---:|---:|---:|---:|"]
    for full, name in ((False, "hpd rollouts (stop at EOS)"), (True, f"all {args.new} tokens (EOS masked)")):
        rows = []
        hf_rollouts(backend, model, tok, prompts, args.new, full)  # a round each to warm up, not counted
        vllm_rollouts(engine, prompts, args.new, full, -1)
        for r in range(args.rounds):
            started = time.perf_counter()
            n_hf = hf_rollouts(backend, model, tok, prompts, args.new, full)
            t_hf = time.perf_counter() - started
            started = time.perf_counter()
            n_vllm = vllm_rollouts(engine, prompts, args.new, full, r)
            t_vllm = time.perf_counter() - started
            rows.append((n_hf, n_hf / t_hf, n_vllm, n_vllm / t_vllm))
            print(f"{name} round {r}: HF {n_hf} tokens {n_hf / t_hf:.0f}/s, vLLM {n_vllm} tokens "
                  f"{n_vllm / t_vllm:.0f}/s", flush=True)
        ratio, ratios = median_ratio([(r[1], r[3]) for r in rows])
        lines.append(f"| {name} | {rows[-1][0]} | {statistics.median(r[1] for r in rows):.0f} "
                     f"({', '.join(f'{r[1]:.0f}' for r in rows)}) | {rows[-1][2]} | "
                     f"{statistics.median(r[3] for r in rows):.0f} ({', '.join(f'{r[3]:.0f}' for r in rows)}) | "
                     f"**{ratio:.2f}** ({', '.join(f'{x:.2f}' for x in ratios)}) |")
    return lines


def step_config(args, out: Path, engine: str) -> dict:
    return dict(teacher=TEACHER, student=STUDENT, data=DATA, out=str(out), overwrite=True, backend="torch",
                method="hpd", steps=1000, batch_size=args.prompts, max_length=1024, lr=1e-5, progress=False,
                rollout_max_new_tokens=args.new, schedule={"lambda_start": 1.0}, rollout_engine=engine,
                save_every=0, dtype="float32")


def step_times(args, engine, root: Path) -> list[str]:
    """On-policy steps of two loops, one per engine, as `hpd distill` builds them."""
    from hpd.train.rollout import Rollouts, Sampling
    from hpd.train.rollout_vllm import VllmRollouts

    sampling = Sampling(max_new_tokens=args.new)
    loops = {"hf": capture_loop(step_config(args, root / "hf", "hf")),
             "vllm": capture_loop(step_config(args, root / "vllm", "vllm"),
                                  rollout=Rollouts(sampling, VllmRollouts(engine, owned=False)))}
    seen = {name: [] for name in loops}
    for r in range(args.steps + 1):  # the first step of each warms up
        for name, loop in loops.items():
            started = time.perf_counter()
            record = loop.train_step(loop.schedule.plan(loop.state.step))
            step_s = time.perf_counter() - started
            if r:
                seen[name].append((step_s, record["rollout/seconds"], record["rollout/sync_s"],
                                   record["rollout/tokens"]))
            print(f"step {r} {name}: {step_s:.3f} s, rollout {record['rollout/seconds']:.3f} s, "
                  f"sync {record['rollout/sync_s'] * 1e3:.1f} ms, {record['rollout/tokens']} tokens", flush=True)
    lines = ["", f"## On-policy steps (hpd, {args.prompts} rows, rollouts of up to {args.new} tokens; medians of "
             f"{args.steps} steps after one warm-up)", "",
             "| engine | step s | rollout s | rollout tokens | weight sync ms | sync / step |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rows in seen.items():
        step, roll, sync, tokens = (statistics.median(r[i] for r in rows) for i in range(4))
        lines.append(f"| {name} | {step:.3f} | {roll:.3f} | {tokens:.0f} | {sync * 1e3:.1f} | {sync / step:.1%} |")
    ratio, ratios = median_ratio(zip((r[0] for r in seen["hf"]), (r[0] for r in seen["vllm"])))
    lines += ["", f"vLLM step / HF step: **{ratio:.2f}** (steps: {', '.join(f'{x:.2f}' for x in ratios)}); "
              "each loop trains its own student (lr 1e-5: they stay close, and so do their rollouts)."]
    return lines


def profile(args, engine, prompts) -> list[str]:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    vllm_rollouts(engine, prompts, args.new, True, 99)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(v[3] for v in stats.stats.values())  # the outermost call's cumulative time
    parts = {"model forward": "_model_forward", "input preparation": "_prepare_inputs",
             "batch state updates": "_update_states", "sampling": "_sample", "sampled-token bookkeeping":
             "_bookkeeping_sync", "scheduler: schedule": "schedule", "scheduler: update_from_output":
             "update_from_output", "output processing": "process_outputs"}
    lines = ["", "## Where a vLLM rollout spends its time (cProfile, all tokens, one rollout)", "",
             f"{total:.2f} s under the profiler (which inflates Python-heavy parts).", "",
             "| part (vLLM function) | calls | cumulative s | share |", "|---|---:|---:|---:|"]
    for name, func in parts.items():
        found = [(v[3], v[1]) for (file, _, f), v in stats.stats.items() if f == func and "vllm" in file]
        if found:
            seconds, calls = max(found)
            lines.append(f"| {name} (`{func}`) | {calls} | {seconds:.3f} | {seconds / total:.0%} |")
    return lines


def build_model(folder: Path, width: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hpd.models.loading import asset_path

    cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=8192,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(asset_path(STUDENT)).save_pretrained(folder)
    return folder


def memory(args, root: Path) -> list[str]:
    import torch

    from hpd.backends import get_backend
    from hpd.engines.vllm import EngineOptions
    from hpd.engines.vllm_rollouts import StudentEngine
    from hpd.models.memory import ENGINE_RUNTIME, Shape, engine_parts, weight_bytes

    width, layers = (int(x) for x in args.memory.split("x"))
    folder = build_model(root / "model", width, layers)
    backend = get_backend("torch")
    model = backend.load_model(str(folder), trainable=True, dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(input_ids=torch.randint(0, 8192, (2, 32)), labels=torch.randint(0, 8192, (2, 32))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    rss = [("model + one AdamW step", rss_mib())]
    kv_mb = 64
    engine = StudentEngine.start(str(folder), EngineOptions(dtype="float32", max_model_len=256, kv_cache_mb=kv_mb), 2)
    rss.append(("+ engine (KV 64 MiB)", rss_mib()))
    engine.generate([[1, 5, 6, 7]] * 16, [32] * 16, seeds=list(range(16)))
    rss.append(("after a 16 x 32 rollout", rss_mib()))
    load_s = []
    for k in range(args.loads):
        step()
        started = time.perf_counter()
        engine.load_weights(backend.full_weights(model).items())
        load_s.append(time.perf_counter() - started)
        rss.append((f"after weight load {k + 1}", rss_mib()))
    shape = Shape.from_folder(str(folder))
    weights = weight_bytes(shape, 4, backend="torch")
    planned = dict(engine_parts(shape, _setting(kv_mb)))
    measured = rss[-1][1] - rss[0][1]
    lines = ["", f"## Memory: an engine on a random Llama {width} x {layers} ({shape.params() / 1e6:.0f}M params, "
             f"{weights / 2**20:.0f} MiB float32), resident MiB", "",
             "| point | RSS MiB | vs model |", "|---|---:|---:|"]
    lines += [f"| {name} | {value:.0f} | {value - rss[0][1]:+.0f} |" for name, value in rss]
    lines += ["", f"Engine side measured (after the loads, less the model and its step): {measured:.0f} MiB = "
              f"{(measured - kv_mb) / (weights / 2**20):.2f} x the weights + the KV cache. The plan counts "
              f"{planned['rollout engine: weights and loads'] / 2**20:.0f} MiB of weights and loads + {kv_mb} MiB KV, "
              f"and {ENGINE_RUNTIME / 2**20:.0f} MiB of vLLM's runtime (`import vllm` is in the first row here).",
              "", f"A weight load took {statistics.median(load_s) * 1e3:.0f} ms (median; "
              f"{', '.join(f'{x * 1e3:.0f}' for x in load_s)})."]
    engine.shutdown()
    return lines


def _setting(kv_mb: int):
    from hpd.models.memory import Setting

    return Setting(backend="torch", engine_kv=kv_mb * 2**20, engine_dtype=4)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of rollouts per engine (0: none)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="on-policy steps per engine (0: none)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--model", default="", help="WIDTHxLAYERS: rollouts of a random Llama of that shape instead of "
                   "the tiny student (no on-policy steps then)")
    p.add_argument("--loads", type=int, default=6, help="--memory: weight loads to measure after")
    p.add_argument("--memory", default="", help="WIDTHxLAYERS of a random Llama to measure memory on (e.g. 1024x8)")
    p.add_argument("--out", default="runs/vllm-rollouts")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import vllm

    with tempfile.TemporaryDirectory() as root:
        backend, tok, model, prompts, engine, start_s = setup(args, Path(root))
        lines = [f"# vLLM rollouts vs transformers generate (commit {commit()}, vllm {vllm.__version__}, "
                 f"{args.threads} torch threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average "
                 f"{os.getloadavg()[0]:.1f} at the start)", "", f"Engine start: {start_s:.1f} s.", ""]
        if args.rounds:
            lines += throughput(args, backend, model, tok, prompts, engine)
        if args.steps and not args.model:  # the tiny teacher goes with the tiny student
            lines += step_times(args, engine, Path(root))
        if args.profile:
            lines += profile(args, engine, prompts)
        if args.memory:
            lines += memory(args, Path(root))
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
