#!/usr/bin/env bash
# The GPU figures in one command on the device tool's H200 machine, run from the repo root:
#     bash benchmarks/gpu_run.sh [bench_gpu.py options]          (benchmarks/GPU.md: the `run` call)
# Installs the wheels carried in .whl/ (`make gpu-wheels`: what that machine lacks) into a scratch
# --target on PYTHONPATH, then runs benchmarks/bench_gpu.py with a budget so that the whole script
# ends within GPU_RUN_BUDGET_S seconds (default 450: under 8 minutes). Everything it prints also goes
# to $OUT/gpu_run.log, the rows to $OUT/gpu_results.json ($OUT: a new temporary folder when unset).
# The check on a CPU: make gpu-wheels GPU_PYTHON=3.11 (this venv's builds beside the H200's 3.12 ones), then
#     PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-450}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-run-out.XXXXXX")}
mkdir -p "$OUT" || exit 2
SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run-site.XXXXXX") || exit 2
trap 'rm -rf "$SITE"' EXIT

check_wheels() {
  # every package in .whl/ needs a build this Python can install: say which lack one, before anything slow
  local pyver tag name missing=""
  pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 2
  tag="cp${pyver/./}"
  for name in $(ls "$WHEELS"/*.whl 2>/dev/null | sed 's#.*/##; s/-.*//' | sort -u); do
    ls "$WHEELS/$name"-*.whl | sed 's#.*/##' | grep -qE -- "-(py3|py2\.py3|$tag)-|-abi3-" \
      || missing="$missing $name"
  done
  if [ -n "$missing" ]; then
    echo "gpu_run.sh: $WHEELS/ has no build for this Python ($pyver, $tag) of:$missing."
    echo "gpu_run.sh: run make gpu-wheels GPU_PYTHON=$pyver first (it adds them beside the others)"
    return 3
  fi
}

install_wheels() {
  # by name, so pip takes each package's build for this Python (.whl/ may hold several)
  local names
  names=$(ls "$WHEELS"/*.whl 2>/dev/null | sed 's#.*/##; s/-.*//' | sort -u)
  if [ -z "$names" ]; then
    echo "gpu_run.sh: no wheels in $WHEELS/ (make gpu-wheels); using what $PY has"
    return 0
  fi
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" --find-links "$WHEELS" $names || return 1
  echo "installed from $WHEELS/ into $SITE:" $names
}

main() {
  echo "gpu_run.sh: $(date -u +%FT%TZ), budget ${BUDGET} s, output in $OUT"
  check_wheels || return $?
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  fi
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
            "| CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())' || return 2
  install_wheels || { echo "gpu_run.sh: the wheel install failed (.whl/ needs builds for this Python:" \
    "make gpu-wheels GPU_PYTHON=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])'))"; return 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # what the rows import, deeply (the bench, training, the CLIP and UNet classes), before any JPEG is made
  "$PY" -c 'import diffusers, zarr, numcodecs, simplejpeg, pyspng, webdataset, google_crc32c
import benchmarks.bench_gpu, stages.train
from diffusers import UNet2DModel
from transformers import CLIPVisionModelWithProjection
print("diffusers", diffusers.__version__, "| zarr", zarr.__version__, "| from", diffusers.__file__)' 2>&1 \
    || { echo "gpu_run.sh: the project's packages do not import (make gpu-wheels, carry .whl)"; return 3; }
  local left rc
  left=$(( BUDGET - ($(date +%s) - START) ))
  # bench_gpu.py plans its rows within left - 40 s and rewrites its JSON after each row; a hard stop
  # at left - 10 s keeps the script inside its budget even if a row runs past its estimate.
  timeout --kill-after=5 $(( left - 10 )) "$PY" benchmarks/bench_gpu.py --budget-s $(( left - 40 )) \
    --out "$OUT/gpu_results.json" "$@"
  rc=$?
  if { [ $rc = 124 ] || [ $rc = 137 ]; } && [ -f "$OUT/gpu_results.json" ]; then
    echo "gpu_run.sh: bench_gpu.py was stopped at the budget; the rows it finished:"
    "$PY" benchmarks/bench_gpu.py --table "$OUT/gpu_results.json"
  fi
  echo "gpu_run.sh: done in $(( $(date +%s) - START )) s, exit $rc"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
