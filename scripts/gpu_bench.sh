#!/usr/bin/env bash
# Issue 15, item 6: the GPU numbers, as one prepared run for a lent GPU machine (about 8 minutes).
#
#   1. purefine against transformers + peft on the GPU: LoRA, QLoRA and full fine-tuning in bf16 of a random
#      ~1B Llama (Llama-3.2-1B's shape) at 4 x 1024, and the 134M LoRA case (scripts/bench.py --device cuda);
#      peak GPU memory is torch.cuda.max_memory_allocated of each fresh child process.
#   2. a Llama-2-7B-shaped QLoRA step (random NF4 weights, batch 1 x 256 packed tokens): seconds per step
#      and peak GPU memory from the run's metrics.jsonl.
#
# The GPU image has torch, transformers and peft but not all of purefine's requirements. Fetch the
# missing wheels once, on a machine with pip access, into .whl/ (ignored by git):
#
#   bash scripts/gpu_bench.sh --fetch-wheels
#
# then run it there with .whl carried (device tool: carry [".whl"], command `bash scripts/gpu_bench.sh`).
# What it prints, and the files it writes under $OUT (or ./gpu-bench-out), are the numbers for
# docs/performance.md. GPU_BENCH_DEVICE=cpu GPU_BENCH_CASES=llama-tiny/lora/fp32 GPU_BENCH_MODEL=llama-tiny
# GPU_BENCH_WHEELS=none runs the same plumbing on a CPU in a minute, with this machine's own packages
# (tests/test_bench.py does, as a smoke test of this script).
set -uo pipefail

WHEELS=(optree tyro docstring-parser typeguard shtab datasets dill multiprocess torchao "bitsandbytes>=0.45")
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    exit $?
fi

PY="${GPU_BENCH_PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-bench-out}"
mkdir -p "$OUT"
DEVICE="${GPU_BENCH_DEVICE:-cuda}"
MODEL="${GPU_BENCH_MODEL:-llama2-7b}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEEL_DIR="${GPU_BENCH_WHEELS:-.whl}"
if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl \
        || { echo "gpu_bench: installing $WHEEL_DIR/ failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

"$PY" scripts/gpu_bench_env.py 2>&1 | tee "$OUT/env.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$OUT/env.txt"

status=0
read -r -a CASES <<< "${GPU_BENCH_CASES:-}"
timeout "${GPU_BENCH_TIMEOUT:-330}" "$PY" scripts/bench.py --against hf --device "$DEVICE" --steps 5 --warmup 2 \
    --rounds 1 ${CASES[@]+--cases "${CASES[@]}"} --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" || status=1

RUN_DIR="$(mktemp -d)/qlora"
timeout "${GPU_BENCH_7B_TIMEOUT:-200}" "$PY" scripts/train.py --model "$MODEL" --peft qlora --init random \
    --max-steps 4 --batch-size 1 --max-seq-len 256 --data.packing --device "$DEVICE" --eval-batches 1 \
    --output-dir "$RUN_DIR" 2>&1 | tee "$OUT/qlora_7b.log" || status=1
cp "$RUN_DIR/metrics.jsonl" "$OUT/qlora_7b_metrics.jsonl" || status=1
"$PY" scripts/gpu_bench_env.py --steps "$OUT/qlora_7b_metrics.jsonl" "$MODEL" 2>&1 | tee -a "$OUT/qlora_7b.log" || status=1
exit $status
