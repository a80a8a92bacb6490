"""Packaging metadata: one version, py.typed shipped, CHANGELOG, docs and wheel check in CI.

Fast checks of the files only; the real build (sdist + wheel, installed into a fresh
environment, examples run from it) is `./run.sh wheel-check`, run by `.ci/run`.
"""

from __future__ import annotations

import ast
import pathlib
import re
import tomllib

from setuptools.config.pyprojecttoml import read_configuration

import dett_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _static_version() -> str:
  """`__version__` as written in dett_jax/__init__.py (what setuptools reads without importing)."""
  tree = ast.parse((ROOT / "dett_jax" / "__init__.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
      return ast.literal_eval(node.value)
  raise AssertionError("no literal __version__ = '...' in dett_jax/__init__.py")


def test_version_is_defined_once_in_the_package():
  project = _pyproject()["project"]
  assert "version" not in project, "pyproject.toml must not repeat the version"
  assert "version" in project["dynamic"]
  assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dett_jax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?", dett_jax.__version__)
  assert _static_version() == dett_jax.__version__


def test_setuptools_resolves_the_dynamic_version():
  config = read_configuration(ROOT / "pyproject.toml", expand=True)
  assert config["project"]["version"] == dett_jax.__version__


def test_py_typed_is_package_data():
  assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["dett_jax"]
  assert (ROOT / "dett_jax" / "py.typed").is_file(), "dett_jax/py.typed (PEP 561 marker) is missing"


def test_changelog_has_the_current_version():
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(rf"^## \[{re.escape(dett_jax.__version__)}\]", changelog, re.M), (
      f"CHANGELOG.md has no '## [{dett_jax.__version__}]' section")


def test_docs_and_wheel_check_are_wired_into_ci():
  extras = _pyproject()["project"]["optional-dependencies"]
  assert any(req.startswith("mkdocs>=") for req in extras["docs"])
  assert any(req.startswith("mkdocstrings[python]>=") for req in extras["docs"])
  assert any(req.startswith("build>=") for req in extras["dev"])
  ci = (ROOT / ".ci" / "run").read_text()
  assert "./run.sh docs" in ci and "./run.sh wheel-check" in ci
  mkdocs = (ROOT / "mkdocs.yml").read_text()
  assert "own-code.md" in mkdocs and "api.md" in mkdocs
  assert re.search(r"^::: dett_jax$", (ROOT / "docs" / "api.md").read_text(), re.M)
  assert "docs/own-code.md" in (ROOT / "README.md").read_text()


def _requirement_name(requirement: str) -> str:
  return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_licence_is_apache_2_in_the_metadata_and_the_sdist():
  project = _pyproject()["project"]
  assert project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert re.search(r"^include .*\bLICENSE\b", (ROOT / "MANIFEST.in").read_text(), re.M)


def test_required_dependencies_are_what_training_imports():
  """Every third-party module that dett_jax/, train.py and configs/ import comes from a required
  dependency, except the optional ones (imported lazily, where they are used); and no test,
  docs or PyTorch tool is required."""
  import importlib.metadata
  import sys

  optional = {"torch", "tensorflow_datasets"}  # extras: torch, celeba
  files = [*(ROOT / "dett_jax").rglob("*.py"), ROOT / "train.py", *(ROOT / "configs").glob("*.py")]
  modules = set()
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules |= {alias.name.split(".")[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules.add(node.module.split(".")[0])
  configs = {path.stem for path in (ROOT / "configs").glob("*.py")}  # configs import each other
  modules -= set(sys.stdlib_module_names) | {"dett_jax", "__future__"} | configs | optional
  project = _pyproject()["project"]
  required = {_requirement_name(r) for r in project["dependencies"]}
  distributions = importlib.metadata.packages_distributions()
  for module in sorted(modules):
    names = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
    assert names & required, f"{module} is imported but comes from none of {sorted(required)}"
  assert not required & {"torch", "transformers", "pytest", "pytest-xdist", "hypothesis", "mkdocs",
                          "build", "tensorflow-datasets"}
  assert {"torch", "test", "docs", "dev"} <= set(project["optional-dependencies"])


def test_fast_tier_leaves_out_the_files_marked_slow():
  ini = _pyproject()["tool"]["pytest"]["ini_options"]
  assert any(marker.startswith("slow:") for marker in ini["markers"])
  assert "--strict-markers" in ini["addopts"]
  run = (ROOT / "run.sh").read_text()
  assert re.search(r'^  test-fast\).*pytest.* -m "not slow"', run, re.M)
  for name in ("test_end_to_end.py", "test_multihost.py", "test_sweep.py", "test_examples.py",
               "test_benchmarks.py"):
    assert "pytestmark = pytest.mark.slow" in (ROOT / "tests" / name).read_text(), name
