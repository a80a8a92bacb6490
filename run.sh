#!/usr/bin/env bash
# Set-up and the project's commands, on a machine with only Python 3.11+:
#   ./run.sh demo [WORKDIR]   the full pipeline on the built-in benchmark (default runs/demo)
#   ./run.sh install          only the set-up that demo needs (the package, what training needs)
#   ./run.sh test             the test suite (what CI runs)
#   ./run.sh test-fast        the unit tests only: the suite less the files marked slow
#                             (end-to-end runs, multi-host, sweeps, benchmarks, examples)
#   ./run.sh docs [SITE_DIR]  the API reference site, mkdocs build --strict (default site/)
#   ./run.sh wheel-check      sdist + wheel, the wheel installed into a fresh virtual
#                             environment outside the checkout, every examples/*.py run with it
# Each first creates .venv and installs into it, once, what that command needs: demo and
# install the package with its required dependencies; test and test-fast add the `test`
# extra and PyTorch (for the importer tests; TORCH_SPEC=none leaves it out and they skip);
# docs the `docs` extra; wheel-check the `dev` extra. A level is installed again when
# pyproject.toml is newer than its marker, .venv/.installed-LEVEL.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
# torch only for the PyTorch-importer tests (never needed for training). 2.13.0 is the CPU
# build on this machine's disk; elsewhere set TORCH_SPEC (e.g. TORCH_SPEC=none).
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

# A level is installed when its marker is at least as new as pyproject.toml. A .venv made by
# an earlier run.sh (one marker, .venv/.installed, for everything) counts for every level.
installed() {
  local marker
  for marker in ".venv/.installed-$1" .venv/.installed; do
    if [ -f "$marker" ] && [ ! pyproject.toml -nt "$marker" ]; then return 0; fi
  done
  return 1
}

# setup LEVEL...: the package (editable) with the extras of each level not installed yet.
# Levels: base (the required dependencies), test, docs, dev (extras), torch (TORCH_SPEC
# and the torch extra).
setup() {
  local level missing=() extras=()
  for level in base "$@"; do
    installed "$level" || missing+=("$level")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  echo "run.sh: installing into .venv: ${missing[*]}" >&2
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --quiet --upgrade pip
  fi
  for level in "${missing[@]}"; do
    case "$level" in
      base) ;;
      torch) .venv/bin/pip install --quiet --quiet "$TORCH_SPEC"; extras+=(torch) ;;
      *) extras+=("$level") ;;
    esac
  done
  if [ "${#extras[@]}" = 0 ]; then
    .venv/bin/pip install --quiet --quiet -e .
  else
    .venv/bin/pip install --quiet --quiet -e ".[$(IFS=,; echo "${extras[*]}")]"
  fi
  for level in "${missing[@]}"; do touch ".venv/.installed-$level"; done
}

# What `test` and `test-fast` install: the test extra, and torch unless TORCH_SPEC=none.
test_levels() {
  if [ "$TORCH_SPEC" = none ]; then echo test; else echo test torch; fi
}

# Builds the sdist and (from it) the wheel into a temporary folder, installs the wheel with
# its dependencies from the package index into a new virtual environment there, and runs
# every examples/*.py, copied out of the checkout, with that environment's python: what a
# user who pip-installs dett-jax gets. Fails if any example fails.
wheel_check() {
  local tmp dist wheel sdist venv run failed=() ran=0 example start rc
  WHEEL_CHECK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dett-jax-wheel.XXXXXX")"
  trap 'rm -rf "$WHEEL_CHECK_DIR"' EXIT
  tmp="$WHEEL_CHECK_DIR" dist="$WHEEL_CHECK_DIR/dist" venv="$WHEEL_CHECK_DIR/venv" run="$WHEEL_CHECK_DIR/run"
  start=$SECONDS
  .venv/bin/python -m build --outdir "$dist" . > "$tmp/build.log" 2>&1 \
    || { cat "$tmp/build.log" >&2; echo "wheel-check: python -m build failed" >&2; return 1; }
  wheel="$(ls "$dist"/*.whl)" sdist="$(ls "$dist"/*.tar.gz)"
  echo "wheel-check: built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - start)) s"
  .venv/bin/python - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
for required in ("dett_jax/__init__.py", "dett_jax/py.typed"):
  if required not in names:
    sys.exit(f"wheel-check: {required} missing from {wheel}")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
  sys.exit(f"wheel-check: LICENSE missing from {wheel}")
stray = sorted({n.split("/")[0] for n in names} - {"dett_jax"} - {n.split("/")[0] for n in names if ".dist-info/" in n})
if stray:
  sys.exit(f"wheel-check: the wheel holds more than the package: {stray}")
members = {m.split("/", 1)[-1] for m in tarfile.open(sdist).getnames()}
for required in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "dett_jax/py.typed"):
  if required not in members:
    sys.exit(f"wheel-check: {required} missing from {sdist}")
PY
  start=$SECONDS
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "$wheel"
  echo "wheel-check: fresh environment with the wheel and its dependencies in $((SECONDS - start)) s"
  mkdir "$run"
  if [ -d examples ]; then cp -R examples/. "$run/"; fi
  # Run from outside the checkout, so `import dett_jax` can only find the installed wheel.
  (cd "$run" && "$venv/bin/python" -c "
import dett_jax, importlib.metadata as md, sys
assert dett_jax.__file__.startswith(sys.prefix), f'dett_jax imported from {dett_jax.__file__}, not the fresh environment'
assert md.version('dett-jax') == dett_jax.__version__, (md.version('dett-jax'), dett_jax.__version__)
print(f'wheel-check: dett_jax {dett_jax.__version__} from {dett_jax.__file__}')") || return 1
  for example in "$run"/*.py; do
    [ -e "$example" ] || continue
    ran=$((ran + 1)) start=$SECONDS
    rc=0
    (cd "$run" && timeout "${EXAMPLE_TIMEOUT:-600}" "$venv/bin/python" "$example") > "$tmp/example.log" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
      echo "wheel-check: examples/$(basename "$example") ok in $((SECONDS - start)) s: $(tail -n 1 "$tmp/example.log")"
    else
      cat "$tmp/example.log" >&2
      echo "wheel-check: examples/$(basename "$example") FAILED (exit code $rc) after $((SECONDS - start)) s" >&2
      failed+=("$(basename "$example")")
    fi
  done
  if [ "$ran" = 0 ]; then echo "wheel-check: no examples/*.py to run" >&2; return 1; fi
  if [ "${#failed[@]}" != 0 ]; then
    echo "wheel-check: ${#failed[@]} of $ran examples failed from the installed wheel: ${failed[*]}" >&2
    return 1
  fi
  echo "wheel-check: all $ran examples ran from the installed wheel"
}

case "${1:-}" in
  demo) setup; exec .venv/bin/python train.py --config=configs/synthetic.py --workdir="${2:-runs/demo}" ;;
  # Two worker processes (whole files each); PYTEST_WORKERS=0 runs in one process.
  test) setup $(test_levels); exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests ;;
  # The same, less the files marked slow (`pytestmark = pytest.mark.slow`): under 90 s on 2 cores.
  test-fast) setup $(test_levels); exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder -m "not slow" tests ;;
  docs)
    setup docs
    site="${2:-site}"
    .venv/bin/mkdocs build --strict --site-dir "$site"
    # Every public name (dett_jax.__all__) must have its entry on the API reference page.
    .venv/bin/python - "$site/api/index.html" <<'PY'
import pathlib, sys
import dett_jax
names = dett_jax.__all__
page = pathlib.Path(sys.argv[1]).read_text()
missing = [name for name in names if f'id="dett_jax.{name}"' not in page]
if missing:
  sys.exit(f"docs: no API reference entry for {missing} (see docs/api.md, mkdocs.yml)")
print(f"docs: API reference documents all {len(names)} names in dett_jax.__all__")
PY
    ;;
  wheel-check) setup dev; wheel_check ;;
  install) setup ;;
  *) echo "usage: ./run.sh demo [WORKDIR] | install | test | test-fast | docs [SITE_DIR] | wheel-check" >&2; exit 2 ;;
esac
