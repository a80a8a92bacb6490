#!/usr/bin/env bash
# The GPU throughput benchmark, for a GPU host without network that already has a CUDA
# build of JAX and PyTorch (Python 3.12) but not all of this project's dependencies.
#
# 1. Beforehand, on a machine with network, put the wheels of the dependencies such a
#    host lacks (grain, ml-collections, tensorboardX, and what they pull in) next to
#    this script:
#
#      pip download --only-binary=:all: --python-version 3.12 \
#          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#          -d benchmarks/wheels grain ml-collections tensorboardX
#
#    (16 wheels, about 22 MB; benchmarks/wheels is not committed.)
# 2. On the GPU host, from a copy of the repository:   bash benchmarks/gpu.sh
#
# What it does, in at most 6 minutes (each part runs under `timeout`):
# - finds a python3 whose jax sees a GPU (`PYTHON=...` to choose one);
# - installs, from benchmarks/wheels only (pip --no-index --no-deps), each distribution
#   of that folder that this python does not have, into benchmarks/.gpu_deps (put on
#   PYTHONPATH with the repository; nothing else on the host changes);
# - runs benchmarks/throughput.py for the papers' pair, ResNet-50 -> ResNet-18 at 224
#   pixels, batch 128, one GPU, in float32 and then bfloat16 (DeTT, DeTT with a cached
#   teacher, KD), each with the PyTorch eager reference of the DeTT step on the same GPU
#   (cudnn.benchmark, bf16 autocast for the bf16 row);
# - appends the tables, the GPU's name (nvidia-smi) and the versions to
#   benchmarks/RESULTS.md, and copies the output and JSON to $OUT when that is set.
#
# Knobs (for a dry run on a CPU machine, as tests/test_benchmarks.py does):
#   PYTHON=python3.12  GPU_BENCH_ALLOW_CPU=1  GPU_BENCH_ARGS="--pair tiny ..."
#   GPU_BENCH_DTYPES="float32 bfloat16"  GPU_BENCH_BUDGET=350 (seconds)
#   WHEELS=dir  GPU_DEPS=dir  RESULTS=file  GPU_BENCH_JSON_DIR=dir (default runs/)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="${WHEELS:-$HERE/wheels}"
DEPS="${GPU_DEPS:-$HERE/.gpu_deps}"
RESULTS="${RESULTS:-$HERE/RESULTS.md}"
BUDGET="${GPU_BENCH_BUDGET:-350}"
DTYPES="${GPU_BENCH_DTYPES:-float32 bfloat16}"
BENCH_ARGS="${GPU_BENCH_ARGS:---pair r50_r18 --image_size 224 --batch 128 --devices 1 --rows dett,dett_cached,kd --steps 10 --warmup 3 --torch auto --torch_device cuda}"
DEADLINE=$((SECONDS + BUDGET))

remaining() { echo $((DEADLINE - SECONDS)); }

# --- a python whose jax has a GPU --------------------------------------------------
find_python() {
  local check='import jax, sys; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)'
  if [ "${GPU_BENCH_ALLOW_CPU:-0}" = 1 ]; then check='import jax'; fi
  for py in ${PYTHON:-} python3 python3.12 python /usr/bin/python3 /usr/local/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    if timeout 120 "$py" -c "$check" >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}
if ! PY="$(find_python)"; then
  echo "gpu.sh: no python3 with a CUDA jax found (tried \$PYTHON, python3, python3.12," \
       "python); set PYTHON=/path/to/python" >&2
  exit 2
fi
echo "gpu.sh: using $PY: $("$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())')"

# --- the dependencies this python lacks, from the wheels folder only ----------------
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
missing=""
if [ -d "$WHEELS" ]; then
  missing="$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, os, sys
names = sorted({f.split("-")[0] for f in os.listdir(sys.argv[1]) if f.endswith(".whl")})
for name in names:
  try:
    md.version(name)
  except md.PackageNotFoundError:
    print(name)
EOF
)"
fi
if [ -n "$missing" ]; then
  echo "gpu.sh: installing from $WHEELS into $DEPS:" $missing
  # shellcheck disable=SC2086  # one argument per distribution name
  timeout 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-index \
    --find-links "$WHEELS" --no-deps --target "$DEPS" $missing
fi
if ! "$PY" -c 'import ml_collections, dett_jax.training.steps' 2>/dev/null; then
  "$PY" -c 'import ml_collections, dett_jax.training.steps' || true
  echo "gpu.sh: dependencies are missing and $WHEELS does not provide them; make it with" \
       "the pip download command at the top of this script" >&2
  exit 3
fi

# --- the benchmark -----------------------------------------------------------------
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
GPU_NAME="${GPU_NAME:-no nvidia-smi}"
VERSIONS="$("$PY" -c '
import importlib.util, platform, jax
v = ["Python " + platform.python_version(), "jax " + jax.__version__]
if importlib.util.find_spec("torch"):
  import torch
  v.append("torch " + torch.__version__ + (" CUDA " + str(torch.version.cuda) if torch.version.cuda else ""))
print(", ".join(v))')"
LOG="$(mktemp)"
JSON_DIR="${GPU_BENCH_JSON_DIR:-$ROOT/runs}"
mkdir -p "$JSON_DIR"
status=0
for dtype in $DTYPES; do
  limit=$(( $(remaining) - 10 ))
  if [ "$limit" -lt 30 ]; then
    echo "(not run: $dtype, the 6-minute budget is spent)" | tee -a "$LOG"
    continue
  fi
  json="$JSON_DIR/gpu_throughput_$dtype.json"
  echo "gpu.sh: throughput.py --dtypes $dtype (at most ${limit} s)" >&2
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  if ! timeout --kill-after=10 "$limit" "$PY" "$HERE/throughput.py" $BENCH_ARGS \
      --dtypes "$dtype" --json "$json" >>"$LOG"; then
    status=1
    echo "(throughput.py --dtypes $dtype did not finish: timed out or failed)" | tee -a "$LOG"
  fi
  if [ -n "${OUT:-}" ] && [ -f "$json" ]; then cp "$json" "$OUT/"; fi
done

{
  echo
  echo "## $GPU_NAME, $(date -u +%Y-%m-%d)"
  echo
  echo "\`bash benchmarks/gpu.sh\` ($VERSIONS; throughput.py $BENCH_ARGS):"
  echo
  grep -v '^wrote ' "$LOG"
} >>"$RESULTS"
sed -i '/^No GPU run has been recorded yet/d' "$RESULTS"
if [ -n "${OUT:-}" ]; then cp "$LOG" "$OUT/gpu_sh_output.md"; cp "$RESULTS" "$OUT/"; fi
cat "$LOG"
rm -f "$LOG"
echo "gpu.sh: appended to $RESULTS (${SECONDS} s)" >&2
exit "$status"
