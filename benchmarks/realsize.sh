#!/usr/bin/env bash
# Real sizes on this CPU, one command: ours unpacked, ours packed and XTuner 0.2.0's InternVL_V1_5 for
# (a) InternViT-300M + Qwen2.5-0.5B full, (b) InternViT-300M + Qwen2.5-1.5B LoRA, (c) SigLIP-so400m + bilinear
# MLP + Qwen2.5-0.5B (benchmarks/realsize.py says what each row does). Random-weight look-alikes with the
# published configs are written once into work_dirs/realsize/models (about 9 GB).
#
#   bash benchmarks/realsize.sh [--out DIR] [--work DIR] [--scaling] [realsize.py options, e.g. --settings a]
#
# --out (default work_dirs/realsize/out) and --work (the models, data and rows' files; default work_dirs/realsize)
# are relative to the caller's folder; the defaults are the checkout's.
#
# Our rows run under jemalloc, as tools/train.py runs on a CPU where it is installed (xtuner_plugins/malloc.py);
# XTuner's rows (and ours without jemalloc) with glibc's malloc keeping what is freed (realsize_report.py's KEEP_FREED): by
# default glibc returns every block over 32 MB to the kernel when it is freed, and each new activation of that size
# is page-faulted in again (an elementwise op on a fresh [3611, 8960] bf16 tensor: 15 ms against 4 ms; growing
# worse than linearly with the process: benchmarks/RESULTS.md). A GPU's caching allocator does the same keeping.
# --malloc keep runs every row on glibc keeping what is freed; --malloc default leaves glibc's defaults. The
# conversion after the rows runs with glibc's defaults, as a user runs it.
#
# Without options it runs what fits and what training does by default on this machine: (a) and (b) at 6 tiles per
# image under 32 GiB of memory (XTuner's rows do not fit at 12), and the compiled rows beside the eager ones where
# compile_blocks='auto' compiles (a CPU with native bf16: 13 minutes on the 2-core AMX Xeon, benchmarks/RESULTS.md).
# The rows took 22 minutes on a 2-core CPU whose bf16 roofline (the first line) is 0.40 TFLOP/s (16-20 at 0.8-0.9
# when XTuner's check still took a step of its own). --scaling then runs the scaling series too
# (benchmarks/realsize_scaling.py: tiles 1/4/7/13, tokens per pack 2k..16k; a table and a PNG in DIR; about 16
# minutes more at 0.8-0.9). REALSIZE_DEADLINE=<epoch seconds>: no row or series starts after it.
#
# Run it alone on the machine (timings taken beside another heavy process are not figures).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=$ROOT/work_dirs/realsize/out
WORK=$ROOT/work_dirs/realsize
SCALING=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;   # the models, data and rows' files: the rows' and the series' own
        --scaling) SCALING=1; shift ;;
        --no-scaling) SCALING=0; shift ;;   # the default (kept for older command lines)
        *) args+=("$1"); shift ;;
    esac
done
OUT=$(realpath -m "$OUT") WORK=$(realpath -m "$WORK")   # given paths are the caller's, the defaults the checkout's
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
start=$(date +%s)
echo "realsize: $(date -u '+%Y-%m-%d %H:%M UTC'); load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/realsize.txt"
"$PY" benchmarks/realsize.py --out "$OUT" --work "$WORK" "${args[@]}" 2>&1 | grep --line-buffered -v "^\(Warning\|.*INFO\)" | tee -a "$OUT/realsize.txt"
if [ "$SCALING" = 1 ] && { [ -z "${REALSIZE_DEADLINE:-}" ] || [ "$(date +%s)" -lt "${REALSIZE_DEADLINE%.*}" ]; }; then
    # glibc handing freed blocks back to the kernel: the series grows its batches in one process, and with the
    # rows' setting (freed memory kept) the heap's free pieces did not serve the larger batches (the 16k-token
    # pack was killed at 24.3 GB resident; RESULTS.md). It reads malloc's bytes in use either way.
    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0 \
        "$PY" benchmarks/realsize_scaling.py --out "$OUT" --work "$WORK" 2>&1 | grep --line-buffered -v "^\(Warning\|.*INFO\)" | tee -a "$OUT/realsize.txt"
fi
echo "realsize wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/realsize.txt"
