#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200): kernel benchmarks, GPU tests, model benchmarks.
# The model step covers every activation mode: baseline, approx (the paper), auto (the default
# convert()), recompute, grad ckpt, torch.compile, compile + auto: peak memory and samples/s each.
#
# Installs nothing from anywhere: it uses the machine's python3 (torch, triton, transformers, timm,
# peft are in its image). If this repo's package is not importable it is built from this checkout
# into a private folder (--no-index --no-deps: offline, touches no system site-packages).
# Every step has its own time limit (100 + 70 + 30 + 190 + 80 s) so the whole run stays under 8 minutes;
# each step's output goes to $OUT/<step>.log (default OUT=./out), the tables to $OUT/gpu_models.md
# and .json, and a summary with every step's exit status and duration to $OUT/gpu_report.md.
#
#   bash bench/gpu.sh                  # on the GPU machine, from the repo root
#   OUT=/tmp/x bash bench/gpu.sh       # elsewhere
#   GPU_DRY_RUN=1 bash bench/gpu.sh    # on a CPU machine: exercises the script (tiny, --device cpu)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
PY=${PYTHON:-python3}
DRY=${GPU_DRY_RUN:-0}
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.md"
START=$(date +%s)
SCRATCH=$(mktemp -d)  # bookkeeping stays out of $OUT: the device tool returns at most 8 files
STEPS="$SCRATCH/steps.md"

if ! "$PY" -c "import lowmembp_convert.kernels" 2>/dev/null; then
    SITE="$SCRATCH/site"
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$SITE" . \
        >"$SCRATCH/pip.log" 2>&1 || { echo "building the checkout failed:" >&2; tail -n 20 "$SCRATCH/pip.log" >&2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME LIMIT_S COMMAND...: run with a time limit, keep its output, record status and seconds.
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local secs=$(($(date +%s) - t0))
    echo "| $name | $rc | ${secs} s | \`$*\` |" >>"$STEPS"
    echo "== $name: exit $rc after ${secs} s" >&2
    return 0
}

{
    echo "# GPU run $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
    echo
} >"$REPORT"
echo "| step | exit | time | command |" >"$STEPS"
echo "|---|---:|---:|---|" >>"$STEPS"

if [ "$DRY" = 1 ]; then
    step models 300 "$PY" bench/gpu_models.py --device cpu --tiny --steps 1 --out "$OUT" --only vit-lora \
        --columns baseline auto approx recompute
else
    # 1. kernels: correctness + bandwidth against torch and the copy roofline (bench/kernel_bench.py).
    step kernels 100 "$PY" bench/kernel_bench.py --markdown
    # 2. GPU correctness tests: the ops tests (they run on CUDA when present), then every gpu-marked test.
    step tests 70 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/ops
    step tests_gpu 30 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
    # 3. models: peak memory and throughput, largest batch in a budget. Its own deadline stops new
    #    cells at 140 s; the limit leaves room for the cell in flight (a compile takes about a minute).
    step models 190 "$PY" bench/gpu_models.py --out "$OUT" --deadline-s 140
    # 4. the loss head on Qwen2-0.5B shapes: saved bytes, peak (max_memory_allocated) and step time,
    #    stock / convert without the head / the exact head.
    #    Then the head alone on three model shapes: stock, exact, fused, the row kernel and (when
    #    installed) Liger's fused linear cross-entropy, peak and time side by side. Both tables go to
    #    loss_head.log (the device tool returns 8 files).
    step loss_head 80 sh -c "\"$PY\" bench/loss_head.py --only qwen2_0.5b --reps 3 --device cuda; \"$PY\" bench/head_kernels.py --device cuda --reps 3"
fi

{
    echo "## Steps"
    cat "$STEPS"
    for name in kernels models loss_head; do
        if [ -f "$OUT/$name.log" ]; then
            echo
            echo "## $name (last 80 lines of its output)"
            echo
            tail -n 80 "$OUT/$name.log"
        fi
    done
    for name in tests tests_gpu; do
        if [ -f "$OUT/$name.log" ]; then
            echo
            echo "## $name (summary)"
            echo
            echo '```'
            tail -n 25 "$OUT/$name.log"
            echo '```'
        fi
    done
    echo
    echo "Total: $(($(date +%s) - START)) s"
} >>"$REPORT"
cat "$REPORT"
