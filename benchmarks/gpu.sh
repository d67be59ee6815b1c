#!/usr/bin/env bash
# The GPU goals in one command (benchmarks/gpu.py says what it measures); paths are relative to where it is run:
#   bash benchmarks/gpu.sh --out work_dirs/gpu          # on one GPU machine, under 10 minutes
#   bash benchmarks/gpu.sh --tiny --out work_dirs/gpu   # tiny models on the CPU: a smoke run of every row
# On an offline GPU image with torch but not our stack (../shared/gpu/README.md), the wheels in .whl/ are
# installed into /tmp/site first (once per machine). ../shared/gpu/fetch-wheels.sh leaves out platformdirs (yapf
# needs it; mmengine imports yapf): fetch it beside them once, from the project's root:
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 platformdirs
# and, for the `packed segments liger` rows (Liger Kernel; pure Python over the image's Triton), its wheel:
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: liger-kernel==0.8.4
# PYTHON picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
export GPU_BENCH_START="${GPU_BENCH_START:-$(date +%s)}"  # the run's budget counts from here
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
if ! "$py" -c 'import xtuner' >/dev/null 2>&1; then
  if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    if [ ! -f /tmp/site/.installed ]; then
      echo "installing .whl/ into /tmp/site (xtuner is not importable)" >&2
      "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$root"/.whl/*.whl
      if ls "$root"/.whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
        DS_BUILD_OPS=0 "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
          "$root"/.whl/deepspeed-*.tar.gz
      fi
      touch /tmp/site/.installed
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "warning: xtuner is not importable and there is no .whl/ (bash ../shared/gpu/fetch-wheels.sh):" \
         "its rows will fail" >&2
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! err="$("$py" -c 'import xtuner.model, mmengine.runner, peft, transformers' 2>&1)"; then
  echo "error: the stack does not import (every row would fail): $(echo "$err" | tail -1)" >&2
  echo "a missing module: add its wheel to .whl/ (see the top of benchmarks/gpu.sh) and rm -rf /tmp/site" >&2
  exit 1
fi
exec "$py" "$root/benchmarks/gpu.py" "$@"
