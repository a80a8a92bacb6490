"""Methods as plug-ins, and named randomness.

A method defined in a module of its own (tests/plugin_method.py) and listed in
`config.plugins` trains through train.py (pipeline, evaluation, report) and a stacked
sweep with no edit to dett_jax; a student's results do not depend on the order of
`distill.methods`."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config, tiny_config
from dett_jax import methods, rng
from dett_jax.checkpoints import load_variables
from dett_jax.experiment import train_and_evaluate
from dett_jax.sweep import run_sweep

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_STAGES = ("pretrain_teacher", "teacher_erm", "teacher_dfr", "identification")


def test_named_seeds_are_stable_and_distinct():
  assert rng.seed(0, "student_dett", "data") == rng.seed(0, "student_dett", "data")
  seeds = {rng.seed(s, "student_" + m, p) for s in (0, 1) for m in methods.BUILTIN
           for p in ("init", "data", "step")}
  assert len(seeds) == 2 * len(methods.BUILTIN) * 3  # no two streams share a seed
  assert all(0 <= s < 2**31 for s in seeds)


def test_plugin_method_trains_through_train_py_and_the_report(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  out = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.pretrain.enabled=False",
                        "--config.plugins=plugin_method", "--config.distill.methods=tracked_kd"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  entry = json.load(open(tmp_path / "results.json"))["models"]["student_tracked_kd"]
  assert entry["method"] == "tracked_kd" and "test/agreement" in entry["metrics"]
  assert "student_tracked_kd" in (tmp_path / "report.md").read_text()
  # Its own state was trained and selected with the rest: one count per step.
  final = load_variables(str(tmp_path / "student_tracked_kd" / "final"))
  done = json.load(open(tmp_path / "student_tracked_kd" / "done.json"))
  assert float(final["collections"]["tracker"]["count"]) == done["history"][-1]["step"] > 0
  logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("tracked_loss" in r for r in logged if r.get("stage") == "student_tracked_kd")


def test_plugin_method_trains_in_a_stacked_sweep(tmp_path):
  config = load_config("ablation", "tiny")
  config.plugins = "plugin_method"
  config.pretrain.enabled = False
  config.sweep.method = "tracked_kd"
  config.sweep.axes = ml_collections.ConfigDict({"seed": (0, 1)})
  config.sweep.subset = ""
  out = run_sweep(config, str(tmp_path))
  assert [r["method"] for r in out["runs"]] == ["tracked_kd"] * 2
  (group,) = out["groups"].values()
  assert group["variants"] == 2  # one stacked group
  a, b = (r["metrics"]["test/avg_acc"] for r in out["runs"])
  assert 0 <= a <= 1 and 0 <= b <= 1


def test_reordering_the_methods_gives_identical_students(tmp_path):
  """Each student's seeds are named by its stage, not its position: "kd,jtt" and "jtt,kd"
  train the same students (teacher stages shared by copying them)."""
  first, second = tmp_path / "first", tmp_path / "second"
  overrides = {"pretrain.enabled": False}
  one = train_and_evaluate(tiny_config(**overrides, **{"distill.methods": "kd,jtt"}), str(first))
  second.mkdir()
  for stage in TEACHER_STAGES:
    if (first / stage).exists():
      shutil.copytree(first / stage, second / stage)
  shutil.copy(first / "config.json", second / "config.json")
  two = train_and_evaluate(tiny_config(**overrides, **{"distill.methods": "jtt,kd"}), str(second))
  assert list(one["models"])[-2:] == ["student_kd", "student_jtt"]
  assert list(two["models"])[-2:] == ["student_jtt", "student_kd"]
  for name in ("student_kd", "student_jtt"):
    m1, m2 = one["models"][name]["metrics"], two["models"][name]["metrics"]
    assert m1.keys() == m2.keys()
    np.testing.assert_array_equal([m1[k] for k in sorted(m1)], [m2[k] for k in sorted(m2)])
