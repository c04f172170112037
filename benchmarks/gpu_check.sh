#!/usr/bin/env bash
# A short distillation on CUDA in bfloat16 with random "tiny-ish" models (built here, no
# download): tokens/s and peak GPU memory on one GPU (chunked and plain loss, packed rows,
# a LoRA and a QLoRA student, a teacher store), then data-parallel on all GPUs of this machine with
# torchrun (FSDP2, DDP, FSDP2 with a sharded teacher); the chunked run again at the CPU's
# 64 MiB chunk budget (CUDA's default is 1 GiB) and under
# --compile off, beside the default (--compile auto: compiled on CUDA) one (tokens/s and MFU); a short run of the paper-math
# recipe scored by `hpd eval --recipe paper-math`; `python -m benchmarks.cuda_compile_half_logits`
# (half-precision chunk logits; compiled against eager losses and gradients); and where vLLM is
# installed, a store written by vLLM, on-policy runs with rollouts by transformers and by vLLM
# (rollout tokens/s, weight sync), and a served teacher (a vLLM server on 127.0.0.1). Not part of CI.
#
#   bash benchmarks/gpu_check.sh                 # defaults below
#   STEPS=50 BATCH=16 bash benchmarks/gpu_check.sh
#
# Knobs (environment): PYTHON, WORK (scratch folder, default a new temp dir), STEPS (30),
# BATCH (8 sequences per GPU), LENGTH (512 tokens), NPROC (default: number of GPUs),
# DEVICE (cuda; `DEVICE=cpu NPROC=2 SIZE=tiny` runs the same script on CPU as a smoke
# test), SIZE (small: teacher 12 x 1024, student 6 x 512, vocabulary 32768; tiny: a few
# layers of width 64, for the CPU smoke test), SKIP_CUDA_CHECKS (set: skip the compile and
# half-logits checks), VLLM_DTYPE (auto on CUDA, float32 on CPU), ROLLOUT_GPU_SHARE and
# SERVER_GPU_SHARE (the GPU memory share of the rollout engine and of the server, 0.3 each).
set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d -t hpd-gpu-check-XXXX)}
STEPS=${STEPS:-30}
BATCH=${BATCH:-8}
LENGTH=${LENGTH:-512}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-small}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L | wc -l)
fi
echo "work folder: $WORK; $NPROC processes for the data-parallel runs; device $DEVICE"

# ---------------------------------------------------------------- models, tokenizer, data
"$PYTHON" - "$WORK" "$SIZE" "$LENGTH" <<'EOF'
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

work, size, length = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if (work / "math_held.jsonl").exists():
    sys.exit(0)
words = ("the cat sat on a mat and the dog ran to it while one two three four five six seven eight "
         "nine ten plus minus equals answer is what how many apples pears has gives").split()
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(length // 3, length // 2))) for _ in range(1024)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts[:200], trainers.BpeTrainer(
    vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>")
fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# a realistic vocabulary for the loss's cost; the tokenizer uses the first few hundred ids
shapes = {"small": dict(vocab=32768, teacher=(1024, 12), student=(512, 6)),
          "tiny": dict(vocab=2048, teacher=(64, 2), student=(64, 1))}[size]  # vLLM's CPU attention: head_dim 32
for name, seed in (("teacher", 1), ("student", 2)):
    hidden, layers = shapes[name]
    cfg = AutoConfig.for_model("llama", vocab_size=shapes["vocab"], hidden_size=hidden,
                               intermediate_size=hidden * 3, num_hidden_layers=layers,
                               num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
                               max_position_embeddings=2 * length, rope_theta=10000.0,
                               bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                               pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(work / name)
    fast.save_pretrained(work / name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {layers} layers x {hidden}, vocabulary {shapes['vocab']}, {params:.0f}M parameters")
with open(work / "train.jsonl", "w") as fh:
    for i in range(0, len(texts) - 1, 2):
        fh.write(json.dumps({"prompt": texts[i][: len(texts[i]) // 4], "completion": texts[i + 1]}) + "\n")
# stand-in rows for the paper-math recipe: a worked sum ending in a boxed answer
for name, n, offset in (("math.jsonl", 512, 0), ("math_held.jsonl", 64, 10**6)):
    with open(work / name, "w") as fh:
        for i in range(n):
            r = random.Random(offset + i)
            a, b, c = (r.randint(1, 99) for _ in range(3))
            fh.write(json.dumps({"prompt": f"what is {a} plus {b} plus {c}\n",
                                 "completion": f"{a} plus {b} is {a + b}, plus {c} is {a + b + c}. "
                                               f"\\boxed{{{a + b + c}}}"}) + "\n")
EOF

# the CLI, reporting each rank's peak GPU memory at exit
cat > "$WORK/hpd_with_memory.py" <<'EOF'
import atexit, os, sys

import torch

from hpd.cli.main import cli


def report():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = 2 ** 30
        print(f"rank {os.environ.get('RANK', 0)}: peak GPU memory {torch.cuda.max_memory_allocated() / gib:.2f} GiB "
              f"allocated, {torch.cuda.max_memory_reserved() / gib:.2f} GiB reserved", file=sys.stderr, flush=True)


atexit.register(report)
cli()
EOF

throughput() {  # tokens/s over the steps after the first 3 (compilation, allocator warm-up)
    "$PYTHON" - "$1" "$WORK" "$LENGTH" <<'EOF'
import json, sys
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from hpd.data.batches import load_dataset

run, work, length = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(run / "metrics.jsonl") if '"loss"' in l]
rows = rows[3:] or rows
tokens = sum(r["tokens"] for r in rows)
seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
rate = tokens / seconds


def matmul_params(folder: Path) -> int:
    """Every weight but the input embedding (a lookup, not a product); a tied head counted once more."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    n = 0
    for k, s in shapes.items():
        if "embed_tokens" not in k:
            n += s[0] * (s[1] if len(s) > 1 else 1)
    if "lm_head.weight" not in shapes:
        e = shapes["model.embed_tokens.weight"]
        n += e[0] * e[1]
    return n


# MFU: (6 N_student + 2 N_teacher) FLOPs per input token (attention not counted) against the
# H200's dense bf16 peak (989 TFLOP/s); input tokens from the data's input/target ratio
data = run.name.endswith("paper-math") and work / "math.jsonl" or work / "train.jsonl"
ds = load_dataset(data, AutoTokenizer.from_pretrained(str(work / "student")), length)
ratio = sum(len(e.input_ids) for e in ds.examples) / sum(sum(e.loss_mask[1:]) for e in ds.examples)
flops = (6 * matmul_params(work / "student") + 2 * matmul_params(work / "teacher")) * rate * ratio
print(f"  {rate:,.0f} target tokens/s ({rate * ratio:,.0f} input tokens/s) over steps {rows[0]['step']}-"
      f"{rows[-1]['step']}, last loss {rows[-1]['loss']:.4f}, MFU {100 * flops / 989e12:.2f}% of 989 TFLOP/s")
EOF
}

REST=(--student "$WORK/student" --data "$WORK/train.jsonl" --method hpd --steps "$STEPS" --batch-size "$BATCH"
      --max-length "$LENGTH" --lr 1e-4 --device "$DEVICE" --dtype auto --no-progress --overwrite)
COMMON=(distill --backend torch --teacher "$WORK/teacher" "${REST[@]}")

echo "== one process"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" "${COMMON[@]}" --out "$WORK/run-1"
throughput "$WORK/run-1"

# the same run through the other paths: the plain loss (the chunked path's reference),
# packed rows, a LoRA student (peft) and a teacher store (cache-teacher, then no teacher)
one() {  # name, extra flags...
    local name=$1; shift
    echo "== one process: $name"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" "${COMMON[@]}" \
        --out "$WORK/run-1-$name" "$@"
    throughput "$WORK/run-1-$name"
}
"$PYTHON" -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])][-1]; \
print('  compiled graphs (--compile auto):', {k: v for k, v in r.items() if k.startswith('compile/')})" \
    "$WORK/run-1/metrics.jsonl" || true
one eager --compile off
# the chunk budget: the default run above resolves --chunk-budget-mb 0 to 1024 on CUDA; 64 is
# the CPU default (~85 positions per chunk at this vocabulary), and the plain loss below is
# the reference it should approach
one budget-64 --chunk-budget-mb 64
echo "== the paper-math recipe, short: its models and data swapped for the ones above"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" distill --recipe paper-math \
    --teacher "$WORK/teacher" --student "$WORK/student" --data "$WORK/math.jsonl" --steps "$STEPS" \
    --batch-size "$BATCH" --grad-accum 1 --max-length "$LENGTH" --lr 1e-4 --device "$DEVICE" --no-progress \
    --overwrite --out "$WORK/run-paper-math"
throughput "$WORK/run-paper-math"
for samples in 1 4; do
    echo "   hpd eval --recipe paper-math --samples $samples"
    "$PYTHON" "$WORK/hpd_with_memory.py" eval --recipe paper-math --model "$WORK/run-paper-math" \
        --data "$WORK/math_held.jsonl" --samples "$samples" --max-new-tokens 32 --device "$DEVICE" --json \
        --no-progress
done

if [[ "$DEVICE" == cuda && -z "${SKIP_CUDA_CHECKS:-}" ]]; then
    echo "== python -m benchmarks.cuda_compile_half_logits --skip-profile"
    (cd "$(dirname "$0")/.." && "$PYTHON" -m benchmarks.cuda_compile_half_logits --skip-profile) \
        || echo "cuda_compile_half_logits failed"
fi

one plain --chunked off
one packing --packing
if "$PYTHON" -c "import peft" 2>/dev/null; then
    one lora --lora-rank 16 --lora-alpha 32
    if "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
        # QLoRA: a bitsandbytes NF4 base (widths of the small models are multiples of 64)
        one qlora --lora-rank 16 --lora-alpha 32 --student-quantize 4 || echo "  qlora did not run here (the error above)"
    else
        echo "== one process: qlora skipped (pip install bitsandbytes)"
    fi
else
    echo "== one process: lora and qlora skipped (pip install peft)"
fi
echo "== teacher store: cache-teacher (top-32), then distill from it with no teacher loaded"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" cache-teacher --backend torch \
    --teacher "$WORK/teacher" --data "$WORK/train.jsonl" --out "$WORK/store" --top-k 32 \
    --max-length "$LENGTH" --batch-size "$BATCH" --device "$DEVICE" --no-progress --overwrite
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" distill --backend torch \
    --teacher-cache "$WORK/store" "${REST[@]}" --out "$WORK/run-1-store"
throughput "$WORK/run-1-store"

# ---------------------------------------------------------------- vLLM (pip install -e ".[vllm]")
# the store written by vLLM, rollouts on an engine beside the student, and a served teacher
if "$PYTHON" -c "import vllm" 2>/dev/null; then
    if [[ "$DEVICE" == cuda ]]; then
        VLLM_DTYPE=${VLLM_DTYPE:-auto}
        ROLLOUT_VLLM=(--rollout-vllm-args gpu_memory_utilization=${ROLLOUT_GPU_SHARE:-0.3})
        SERVER_ARGS=(--gpu-memory-utilization "${SERVER_GPU_SHARE:-0.3}")
    else  # the CPU build: float32, a KV cache of 1 GiB
        VLLM_DTYPE=${VLLM_DTYPE:-float32}
        ROLLOUT_VLLM=()
        SERVER_ARGS=()
        export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    fi
    export OMP_WAIT_POLICY=PASSIVE
    echo "== teacher store written by vLLM (cache-teacher --backend vllm, top-32), then distill from it"
    if OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" cache-teacher --backend vllm \
        --teacher "$WORK/teacher" --data "$WORK/train.jsonl" --out "$WORK/store-vllm" --top-k 32 \
        --max-length "$LENGTH" --batch-size "$BATCH" --vllm-arg dtype="$VLLM_DTYPE" --no-progress --overwrite &&
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" distill --backend torch \
        --teacher-cache "$WORK/store-vllm" "${REST[@]}" --out "$WORK/run-1-store-vllm"; then
        throughput "$WORK/run-1-store-vllm"
    else
        echo "  the vLLM store failed"
    fi

    printf 'schedule:\n  lambda_start: 1.0\n' > "$WORK/on-policy.yaml"
    for engine in hf vllm; do
        echo "== on-policy, rollouts by $engine (64 new tokens)"
        extra=()
        [[ "$engine" == vllm ]] && extra=(--rollout-engine vllm "${ROLLOUT_VLLM[@]}")
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" distill --recipe "$WORK/on-policy.yaml" \
            --backend torch --teacher "$WORK/teacher" "${REST[@]}" --rollout-max-new-tokens 64 \
            --out "$WORK/run-1-rollouts-$engine" "${extra[@]}" || { echo "  rollouts by $engine failed"; continue; }
        "$PYTHON" - "$WORK/run-1-rollouts-$engine/metrics.jsonl" <<'EOF2'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if '"rollout/tokens"' in l][3:]
step = statistics.median(r["tokens"] / r["tokens_per_s"] + r["rollout/seconds"] for r in rows)
print(f"  rollout tokens/s {statistics.median(r['rollout/tokens_per_s'] for r in rows):,.0f} (median), "
      f"weight sync {1e3 * statistics.median(r.get('rollout/sync_s', 0.0) for r in rows):.1f} ms, "
      f"step {step:.3f} s (median over steps {rows[0]['step']}-{rows[-1]['step']})")
EOF2
    done

    echo "== a served teacher: a vLLM server on 127.0.0.1, top-32 log-probs, prefetch 2"
    port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    setsid "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$WORK/teacher" --served-model-name teacher \
        --dtype "$VLLM_DTYPE" --max-model-len $((2 * LENGTH)) --max-logprobs 32 --host 127.0.0.1 --port "$port" \
        "${SERVER_ARGS[@]}" > "$WORK/server.log" 2>&1 &
    server=$!
    for _ in $(seq 600); do
        "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$port/health" 2>/dev/null && break
        kill -0 "$server" 2>/dev/null || break
        sleep 1
    done
    if OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" "$WORK/hpd_with_memory.py" distill --backend torch \
        --teacher "http://127.0.0.1:$port/v1" --teacher-top-k 32 --teacher-prefetch 2 "${REST[@]}" \
        --out "$WORK/run-1-served"; then
        throughput "$WORK/run-1-served"
    else
        echo "  the served-teacher run failed; the server's log:"; tail -20 "$WORK/server.log"
    fi
    kill -TERM -- "-$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
else
    echo "== vLLM runs skipped (pip install -e '.[vllm]')"
fi

if [[ "$NPROC" -lt 2 ]]; then
    echo "one GPU only: skipping the torchrun runs"
    exit 0
fi
for variant in "fsdp replicate" "ddp replicate" "fsdp shard"; do
    read -r parallel placement <<<"$variant"
    echo "== torchrun --standalone --nproc-per-node $NPROC: --parallel $parallel --teacher-placement $placement"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        "$WORK/hpd_with_memory.py" "${COMMON[@]}" --out "$WORK/run-$NPROC-$parallel-$placement" \
        --parallel "$parallel" --teacher-placement "$placement"
    throughput "$WORK/run-$NPROC-$parallel-$placement"
done
