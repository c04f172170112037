#!/usr/bin/env bash
# A short distillation on CUDA in bfloat16 with random "tiny-ish" models (built here, no
# download): tokens/s and peak GPU memory on one GPU (chunked and plain loss, packed rows,
# a LoRA and a QLoRA student, a teacher store), then data-parallel on all GPUs of this machine with
# torchrun (FSDP2, DDP, FSDP2 with a sharded teacher). Not part of CI.
#
#   bash benchmarks/gpu_check.sh                 # defaults below
#   STEPS=50 BATCH=16 bash benchmarks/gpu_check.sh
#
# Knobs (environment): PYTHON, WORK (scratch folder, default a new temp dir), STEPS (30),
# BATCH (8 sequences per GPU), LENGTH (512 tokens), NPROC (default: number of GPUs),
# DEVICE (cuda; `DEVICE=cpu NPROC=2 SIZE=tiny` runs the same script on CPU as a smoke
# test), SIZE (small: teacher 12 x 1024, student 6 x 512, vocabulary 32768; tiny: a few
# layers of width 64, for the CPU smoke test).
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
if (work / "train.jsonl").exists():
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
          "tiny": dict(vocab=2048, teacher=(64, 2), student=(32, 1))}[size]
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
    "$PYTHON" - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
rows = rows[3:] or rows
tokens = sum(r["tokens"] for r in rows)
seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
print(f"  {tokens / seconds:,.0f} target tokens/s over steps {rows[0]['step']}-{rows[-1]['step']}, "
      f"last loss {rows[-1]['loss']:.4f}")
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
one plain --chunked off
one packing --packing
if "$PYTHON" -c "import peft" 2>/dev/null; then
    one lora --lora-rank 16 --lora-alpha 32
    if "$PYTHON" -c "import bitsandbytes" 2>/dev/null; then
        # QLoRA: a bitsandbytes NF4 base (widths of the small models are multiples of 64)
        one qlora --lora-rank 16 --lora-alpha 32 --student-quantize 4
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
