#!/usr/bin/env bash
# The checks that need one CUDA GPU, in one or two device calls (PARTS below; each device call runs <= 10 minutes):
#   1. tests/test_gpu.py      compiled FlexAttention == SDPA == CPU; cached generation == full recompute on
#                             the GPU (fp32, bf16); the compiled step (CUDA graphs) == full recompute and a
#                             roll-back; a tiny
#                             training run on the GPU: safe checkpoint reading, damaged-checkpoint fallback,
#                             run folder -> model
#      tests/test_serve.py    blt serve on a CUDA model, eager and compiled (--compile: CUDA graphs, each batch
#                             size compiled first): concurrent clients == their single runs (needs the serve
#                             extra and openai; skipped without them)
#      tests/test_train_scale.py  hash tables with row gradients + fused AdamW on CUDA == plain tables
#   2. bench/generation.py    the compiled step (torch.compile mode="reduce-overhead") and the eager one on
#                             blt-1b (random weights), bf16, batch 1 and 8 (goal: >= 1,000 new bytes/s at batch 1)
#   3. bench/train.py         the trainer's step on blt-1b (random weights; 4 x 4096 bytes, bf16, compiled
#                             FlexAttention, activation checkpointing), eager and compiled blocks: bytes/s,
#                             peak memory, MFU, and the ratio to the reference (46.1 K bytes/s, 73.9 GiB);
#                             goal >= 2x with peak <= 60 GiB (~4 minutes)
#   4. bench/patching.py      entropy-100m (bf16) patching 4 MB: bytes/s vs the reference's 163 K on an H200
#   5. bench/speculative.py   speculative decoding (entropy model drafts, BLT verifies) vs plain cached decoding,
#                             batch 1 and 8, on the built-in model (SPEC_MODEL=... for another; needs
#                             load_model("builtin") or a path): acceptance per draft length, bytes/s
# Runs from a source checkout without installing (PYTHONPATH); needs torch (CUDA), pyyaml, safetensors, pytest.
# Results go to $OUT (default: gpu_results/): one log and one JSON per check; the last lines summarise.
#
#   bash bench/gpu_checks.sh                    # everything (up to ~25 min if every step runs to its timeout)
#   PARTS="1 2" bash bench/gpu_checks.sh         # tests + generation (<= 12 min), then
#   PARTS="3 4 5" bash bench/gpu_checks.sh       # training, patching, speculative (<= 13 min): two device calls
#   SKIP_TRAIN=1 bash bench/gpu_checks.sh        # everything but the training benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
PARTS=" ${PARTS:-1 2 3 4 5} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/gpu.txt"

if part 1; then
echo "== 1. GPU tests"
timeout 300 "$PY" -m pytest -m gpu -q tests/test_gpu.py tests/test_serve.py tests/test_train_scale.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" \
    || status=1
fi

if part 2; then
echo "== 2. generation benchmark (compiled step, blt-1b bf16, batch 1 and 8)"
timeout 420 "$PY" bench/generation.py --device cuda --gpu --new-bytes ${GEN_NEW_BYTES:-512} --repeats 2 \
    --json "$OUT/generation_gpu.json" 2>&1 | tee "$OUT/generation_gpu.txt" || status=1
fi

if part 3 && [ -z "${SKIP_TRAIN:-}" ]; then
    echo "== 3. training benchmark (blt-1b)"
    timeout 300 "$PY" bench/train.py --only blt-1b --steps 10 --warmup 3 --case-timeout 145 \
        --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.txt" || status=1
fi

if part 4; then
echo "== 4. entropy patching of 4 MB (entropy-100m, bf16)"
timeout 240 "$PY" bench/patching.py --gpu --gpu-bytes ${PATCH_BYTES:-4000000} --json "$OUT/patching_gpu.json" 2>&1 \
    | tee "$OUT/patching_gpu.txt" || status=1
fi

if part 5; then
echo "== 5. speculative decoding (built-in model, batch 1 and 8)"
timeout 240 "$PY" bench/speculative.py --device cuda --model "${SPEC_MODEL:-builtin}" --threads 1 --repeats 2 \
    --new-bytes 128 --ks 2,4,8 --json "$OUT/speculative_gpu.json" 2>&1 | tee "$OUT/speculative_gpu.txt" || status=1
fi

echo "== summary (exit $status)"
tail -n 2 "$OUT/pytest_gpu.txt" 2>/dev/null || true
grep -E "^blt-1b " "$OUT/generation_gpu.txt" 2>/dev/null || true
grep -E "^torchblt cuda" "$OUT/patching_gpu.txt" 2>/dev/null || true
grep -E "^(blt-1b vs reference|skipped: blt-1b)" "$OUT/train_gpu.txt" 2>/dev/null || true
exit $status
