#!/usr/bin/env bash
# Set-up and the project's two commands, on a machine with only Python 3.11+:
#   ./run.sh demo [WORKDIR]   the full pipeline on the built-in benchmark (default runs/demo)
#   ./run.sh test             the test suite
# Both first create .venv and install the package with its dependencies (once).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # torch only for the PyTorch-importer tests (never needed for training). 2.13.0 is the
  # CPU build on this machine's disk; elsewhere set TORCH_SPEC (e.g. TORCH_SPEC=none).
  extras="test"
  if [ "${TORCH_SPEC:-torch==2.13.0}" != none ]; then
    .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    extras="test,torch"
  fi
  .venv/bin/pip install --quiet -e ".[$extras]"
  touch .venv/.installed
fi
case "${1:-}" in
  demo) exec .venv/bin/python train.py --config=configs/synthetic.py --workdir="${2:-runs/demo}" ;;
  # Two worker processes (whole files each); PYTEST_WORKERS=0 runs in one process.
  test) exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile tests ;;
  install) ;;
  *) echo "usage: ./run.sh demo [WORKDIR] | test | install" >&2; exit 2 ;;
esac
