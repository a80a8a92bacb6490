"""Every stage and method at a tiny size; resume; teacher checkpoints."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from dett_jax.experiment import train_and_evaluate
from dett_jax import methods

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

ALL_METHODS = ",".join(methods.BUILTIN)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  config = tiny_config(**{"distill.methods": ALL_METHODS})
  return workdir, train_and_evaluate(config, workdir)


def test_every_stage_and_method_runs(full_run):
  workdir, results = full_run
  names = {"teacher_erm", "teacher_dfr"} | {f"student_{m}" for m in methods.BUILTIN}
  assert set(results["models"]) == names
  for name, entry in results["models"].items():
    m = entry["metrics"]
    for key in ("val/worst_group_acc", "test/worst_group_acc", "test/avg_acc", "test/adj_avg_acc"):
      assert 0.0 <= m[key] <= 1.0, (name, key)
    assert m["test/worst_group_acc"] <= m["test/avg_acc"] + 1e-9
    assert sum(k.startswith("test/acc/group_") for k in m) == 4
  for m in ("dett", "simkd", "dett_no_transplant"):
    assert "test/feature_error/group_1_0" in results["models"][f"student_{m}"]["metrics"]
  assert "test/agreement/group_0_0" in results["models"]["student_kd"]["metrics"]
  for f in ("results.json", "report.md", "groups.png", "metrics.jsonl",
            "identification/error_set.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  assert os.listdir(os.path.join(workdir, "tensorboard", "student_dett"))
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["models"]["student_dett"]["role"] == "student"
  assert on_disk["config"]["distill"]["methods"] == ALL_METHODS
  with open(os.path.join(workdir, "identification", "error_set.json")) as f:
    error_set = json.load(f)
  assert error_set["settings"]["T_id"] == 1 and len(error_set["error_set"]) == error_set["size"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "student_dett" in report and "teacher_dfr" in report


def test_rerun_skips_finished_stages(full_run):
  workdir, results = full_run
  before = os.path.getmtime(os.path.join(workdir, "student_dett", "done.json"))
  again = train_and_evaluate(tiny_config(**{"distill.methods": ALL_METHODS}), workdir)
  assert os.path.getmtime(os.path.join(workdir, "student_dett", "done.json")) == before
  assert again["models"] == json.loads(json.dumps(results["models"]))


def test_teacher_checkpoint_is_used_and_checked(full_run, tmp_path):
  workdir, results = full_run
  checkpoint = os.path.join(workdir, "teacher_erm", "final")
  out = train_and_evaluate(tiny_config(**{"distill.methods": "simkd", "teacher.checkpoint": checkpoint}),
                           str(tmp_path / "from_ckpt"))
  np.testing.assert_allclose(out["models"]["teacher_erm"]["metrics"]["test/avg_acc"],
                             results["models"]["teacher_erm"]["metrics"]["test/avg_acc"])
  assert not os.path.exists(str(tmp_path / "from_ckpt" / "pretrain_teacher"))  # not needed
  wrong = tiny_config(**{"distill.methods": "simkd", "teacher.checkpoint": checkpoint,
                         "teacher.width": 0.125})
  with pytest.raises(ValueError, match="does not fit the configured model"):
    train_and_evaluate(wrong, str(tmp_path / "wrong"))


def test_sigterm_checkpoints_the_current_step_and_resume_finishes(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--config.distill.methods=", "--config.pretrain.enabled=False",
         "--config.teacher.optim.epochs=200", "--config.log_every_steps=1"]
  proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (
      metrics.exists() and metrics.read_text().count("teacher_erm") >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 3, stderr[-2000:]
  line = [l for l in stderr.splitlines() if l.startswith("interrupted:")][0]
  assert "(signal 15)" in line
  stopped_at = int(line.split("stopped at step ")[1].split(" ")[0])
  assert 3 <= stopped_at < 1200
  steps = os.listdir(tmp_path / "teacher_erm" / "checkpoints")
  assert str(stopped_at) in steps  # the exact step was checkpointed
  resumed = subprocess.run(cmd + ["--config.stop_after_steps=2"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 3, resumed.stderr[-2000:]
  assert f"stopped at step {stopped_at + 2} of 1200" in resumed.stderr
  logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
            if json.loads(l)["stage"] == "teacher_erm" and "loss" in json.loads(l)]
  assert logged[-2:] == [stopped_at + 1, stopped_at + 2]  # resumed right after the stop


def test_loss_weights_linear_projector_and_pooled_matching(full_run, tmp_path):
  workdir, results = full_run
  checkpoint = os.path.join(workdir, "teacher_erm", "final")
  config = tiny_config(**{"distill.methods": "dett,dett_no_transplant,jtt",
                          "distill.reweight": "loss_weight", "distill.lambda_up": 2.5,
                          "distill.projector": "linear", "distill.match": "pooled",
                          "teacher.checkpoint": checkpoint, "pretrain.enabled": False})
  out = train_and_evaluate(config, str(tmp_path))
  for name in ("student_dett", "student_dett_no_transplant", "student_jtt"):
    assert 0.0 <= out["models"][name]["metrics"]["test/worst_group_acc"] <= 1.0
  # Loss weights keep one pass over the data per epoch (96 // 16 steps), unlike upsampling.
  steps = [json.loads(l)["step"] for l in open(os.path.join(str(tmp_path), "metrics.jsonl"))
           if json.loads(l)["stage"] == "student_dett"]
  assert max(steps) == 6
