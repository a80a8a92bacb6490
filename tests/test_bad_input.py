"""Bad input fails early, with a message naming the field and the fix."""

import json
import os

import pytest

from conftest import tiny_config
from dett_jax.experiment import train_and_evaluate
from dett_jax.validation import ConfigError, check_workdir_config, validate_config


@pytest.mark.parametrize("overrides,match", [
    ({"distill.methods": "dett,foo"}, "unknown method 'foo'"),
    ({"distill.projector": "mlp"}, "unknown projector 'mlp'"),
    ({"distill.lambda_up": 0.5}, "lambda_up=0.5 must be >= 1"),
    ({"distill.lambda_up": 2.5}, "must be an integer with distill.reweight=upsample"),
    ({"distill.reweight": "both"}, "distill.reweight"),
    ({"distill.projector": "identity", "teacher.width": 0.125}, "identity needs equal feature channels"),
    ({"teacher.depth": 11}, "teacher.depth=11"),
    ({"distill.optim.optimizer": "rmsprop"}, "distill.optim.optimizer"),
    ({"teacher.checkpoint": "/nonexistent/ckpt"}, "not a checkpoint directory"),
])
def test_bad_config_fields(overrides, match, tmp_path):
  with pytest.raises(ConfigError, match=match):
    train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "pretrain_teacher")  # failed before any compute


def test_identity_projector_with_equal_shapes_is_accepted():
  validate_config(tiny_config(**{"distill.projector": "identity"}))


def test_batch_not_divisible_by_data_axis(tmp_path):
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))


def test_workdir_of_another_config_is_refused_and_left_intact(tmp_path):
  check_workdir_config(tiny_config(), str(tmp_path))
  stored = (tmp_path / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"different config \(distill.lambda_up \(3.0 -> 50.0\)"):
    check_workdir_config(tiny_config(**{"distill.lambda_up": 50.0}), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == stored
  # Fields that do not change results may differ.
  check_workdir_config(tiny_config(**{"distill.methods": "kd", "log_every_steps": 7}), str(tmp_path))
  assert json.loads(stored)["distill"]["lambda_up"] == 3.0


def test_cli_rejects_bad_field_with_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/synthetic.py", f"--workdir={tmp_path}",
       "--config.distill.methods=dett,nope"], cwd=root, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode != 0
  assert "unknown method 'nope'" in proc.stderr
  assert "Traceback" not in proc.stderr
