"""The programs in examples/ run (quick mode, as a user runs them: a subprocess from another
directory, the installed package) and print sane metrics; benchmarks/examples_match.py
runs the Linen and NNX examples on a train.py-style workdir, where they agree."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dett_jax
import conftest
from conftest import ROOT, load_config

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

EXAMPLES = ("custom_loop_linen", "nnx", "pretrained_teacher")


def example_env(cwd: pathlib.Path) -> dict[str, str]:
  """The environment of an example run by a user, plus the suite's compilation settings."""
  env = dict(os.environ, TMPDIR=str(cwd))   # files an example leaves go under cwd
  # One device, as for a user (conftest simulates 8), compiled as the suite compiles.
  env["XLA_FLAGS"] = getattr(conftest, "FAST_COMPILE", "")
  env.pop("PYTHONPATH", None)
  # The suite's persistent compilation cache, so repeated runs start fast.
  env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or os.path.join(
                 tempfile.gettempdir(), "dett_jax_test_jit_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_example(name: str, *args: str, cwd: pathlib.Path, timeout: float = 300) -> dict:
  """Runs examples/<name>.py; returns the JSON of its last line (asserting exit code 0)."""
  result = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
                          cwd=cwd, env=example_env(cwd), capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  lines = result.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  assert out["example"] == name
  assert any("worst_group_acc" in line for line in lines[:-1]), "metrics not printed before the JSON"
  return out


def check_metrics(out: dict) -> None:
  for key in ("test/worst_group_acc", "test/avg_acc", "test/adj_avg_acc", "val/worst_group_acc",
              "teacher/test/worst_group_acc"):
    assert key in out, key
  for key, value in out.items():
    if "acc" in key:
      assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
  groups = [k for k in out if k.startswith("test/acc/group_")]
  assert sorted(groups) == [f"test/acc/group_{y}_{a}" for y in (0, 1) for a in (0, 1)]
  assert out["test/worst_group_acc"] == min(out[k] for k in groups)
  assert out["steps"] >= 1 and out["selected_epoch"] >= 1 and out["error_set_size"] >= 0


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick_mode(name, tmp_path):
  out = run_example(name, "--steps", "3", cwd=tmp_path)
  check_metrics(out)
  assert out["steps"] == 3


def fake_run(workdir: pathlib.Path) -> None:
  """A workdir laid out as train.py leaves it (configs/tiny.py; constant weights)."""
  config = load_config("tiny")
  splits = dett_jax.load_splits(config.data)
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3))

  def constant_variables(model, scale):
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    leaves, tree = jax.tree.flatten(shapes)
    return tree.unflatten([np.full(s.shape, scale * (1 + i % 3), s.dtype) / np.sqrt(max(s.size, 1))
                           for i, s in enumerate(leaves)])

  teacher = dett_jax.create_resnet(config.teacher.depth, 2, config.teacher.width, config.teacher.stem)
  student = dett_jax.create_resnet(config.student.depth, 8, config.student.width, config.student.stem)
  dett_jax.save_variables(str(workdir / "teacher_erm" / "final"), constant_variables(teacher, 0.5))
  dett_jax.save_variables(str(workdir / "teacher_dfr" / "final"),
                          {"kernel": np.linspace(-1, 1, 2 * 32, dtype=np.float32).reshape(32, 2),
                           "bias": np.zeros(2, np.float32)})
  dett_jax.save_variables(str(workdir / "pretrain_student" / "final"), constant_variables(student, 0.3))
  (workdir / "identification").mkdir()
  error_set = np.flatnonzero(splits["train"].groups % 3 != 0)  # any indices
  (workdir / "identification" / "error_set.json").write_text(
      json.dumps({"error_set": error_set.tolist()}))
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))


def test_examples_match_benchmark_on_a_train_py_workdir(tmp_path):
  """benchmarks/examples_match.py on a workdir laid out as train.py leaves it: both examples
  load it (the NNX one converts the Linen checkpoints by name) and agree with each other."""
  run = tmp_path / "run"
  run.mkdir()
  fake_run(run)
  reference = {"test/worst_group_acc": 0.5, "test/avg_acc": 0.6, "val/worst_group_acc": 0.4}
  (run / "results.json").write_text(json.dumps({"models": {"student_dett": {"metrics": reference}}}))
  result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "examples_match.py"),
                           "--workdir", str(run), "--steps", "2"],
                          cwd=tmp_path, env=example_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  lines = result.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert "| examples/nnx.py |" in "\n".join(lines) and (run / "examples_match.md").is_file()
  train_row, linen, nnx = summary["rows"]
  assert train_row["test/worst_group_acc"] == 0.5
  for row in (linen, nnx):
    assert 0.0 <= row["test/worst_group_acc"] <= 1.0 and isinstance(row["within"], bool)
    assert abs(row["difference"] - 100 * (row["test/worst_group_acc"] - 0.5)) < 1e-9
  # Same teacher, student and batches (the NNX ResNet computes what the Linen one does):
  # the same metrics, up to float rounding.
  for key in ("test/worst_group_acc", "test/avg_acc", "val/worst_group_acc"):
    assert abs(linen[key] - nnx[key]) < 0.03, (key, linen[key], nnx[key])


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_uses_only_the_public_api(name):
  """Examples import `dett_jax` itself and use only names in `dett_jax.__all__`."""
  import ast
  tree = ast.parse((ROOT / "examples" / f"{name}.py").read_text())
  allowed_modules = {"dett_jax", "jax", "flax", "optax", "grain", "numpy", "argparse", "functools",
                     "hashlib", "json", "math", "os", "tempfile", "time", "typing", "__future__"}
  used = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        assert alias.name.split(".")[0] in allowed_modules and not alias.name.startswith(
            "dett_jax."), alias.name
    elif isinstance(node, ast.ImportFrom):
      assert node.module.split(".")[0] in allowed_modules and node.module != "dett_jax" and not (
          node.module.startswith("dett_jax.")), node.module
    elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id == "dett_jax"):
      used.add(node.attr)
  assert used and used <= set(dett_jax.__all__), sorted(used - set(dett_jax.__all__))


# The loops' DeTT step and the helpers each example used to copy.
LOOPS = {"custom_loop_linen": ("train_state.TrainState", ".apply_gradients(",
                               "jax.value_and_grad("),
         "nnx": ("nnx.Optimizer(", "optimizer.update(", "jax.value_and_grad(",
                 "dett_jax.NNXProjector("),
         "pretrained_teacher": ("dett_jax.make_dett_step(",)}
COPIED = {"eval_batches", "per_example", "group_counts", "group_metrics",
          "train_batches", "epochs", "LoadExample"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_with_the_public_loss_and_copies_no_helper(name):
  """The Linen example differentiates `dett_loss` in a Flax `TrainState` loop, the NNX one in
  an `nnx.Optimizer` loop (its projector an `NNXProjector`), the third uses the ready-made
  `make_dett_step`; batches and group evaluation come from the package, not copies."""
  import ast
  source = (ROOT / "examples" / f"{name}.py").read_text()
  for needle in LOOPS[name] + (("dett_jax.dett_loss",) if name != "pretrained_teacher" else ()):
    assert needle in source, (name, needle)
  tree = ast.parse(source)
  defined = {node.name for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
  assert not defined & COPIED, sorted(defined & COPIED)
  for helper in ("dett_jax.epoch_batches", "dett_jax.evaluate_groups"):
    assert helper in source, (name, helper)
