"""Bad input fails early, with a message naming the field and the fix."""

import json
import os

import pytest

from conftest import tiny_config
from dett_jax.experiment import train_and_evaluate
from dett_jax.validation import ConfigError, validate_config
from dett_jax.workdir import check_workdir_config


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
  # Refused before config.json is written: the corrected config may use this workdir.
  assert not (tmp_path / "config.json").exists()


def test_workdir_of_another_config_is_refused_and_left_intact(tmp_path):
  check_workdir_config(tiny_config(), str(tmp_path))
  stored = (tmp_path / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"different config \(distill.lambda_up \(3.0 -> 50.0\)"):
    check_workdir_config(tiny_config(**{"distill.lambda_up": 50.0}), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == stored
  # Fields that do not change results may differ.
  check_workdir_config(tiny_config(**{"distill.methods": "kd", "log_every_steps": 7}), str(tmp_path))
  assert json.loads(stored)["distill"]["lambda_up"] == 3.0


def test_workdir_resumes_on_another_mesh_but_not_with_another_seed(tmp_path):
  check_workdir_config(tiny_config(**{"mesh.cpu_devices": 2}), str(tmp_path))
  stored = (tmp_path / "config.json").read_text()
  # The device count alone, and the whole mesh group (placement only), may change.
  check_workdir_config(tiny_config(**{"mesh.cpu_devices": 4}), str(tmp_path))
  check_workdir_config(tiny_config(**{"mesh.cpu_devices": 8, "mesh.data": 4, "mesh.model": 2,
                                      "mesh.strategy": "fsdp",
                                      "mesh.rules": ("head=replicated",)}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"different config \(seed \(0 -> 1\)\)"):
    check_workdir_config(tiny_config(**{"mesh.cpu_devices": 4, "seed": 1}), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == stored


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


def test_cli_rejects_a_schedule_without_decay_steps_in_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={work}",
       "--config.distill.optim.optimizer=lars", "--config.distill.optim.warmup_epochs=1",
       "--config.distill.optim.accumulate_steps=2", "--config.distill.optim.lr_scaling=linear"],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  message = ("distill.optim.warmup_epochs=1 leaves no decay steps with epochs=1 (and "
             "accumulate_steps=2 over 6 steps per epoch (96 examples / batch_size=16): 3 "
             "updates, all warmup); lower warmup_epochs below epochs or raise epochs")
  # absl's usage error: the flags' help, then the message as the one last line.
  assert proc.stderr.strip().splitlines()[-1] == message
  assert proc.stderr.count("leaves no decay steps") == 1
  assert "Traceback" not in proc.stderr and "decay_steps" not in proc.stderr
  assert not work.exists()  # nothing trained, nothing written


# ---------------------------------------------------------------------------
# Learning-rate schedules (warmup + cosine over epochs * steps_per_epoch // accumulate_steps
# updates, see dett_jax/optimizers.py): refused before any compute. In configs/tiny.py the
# training split has 96 examples (6 batches of 16), pretraining 32 (2 batches), 1 epoch each.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    # warmup_epochs >= epochs: no decay steps (the reported command, and every stage)
    ({"distill.optim.optimizer": "lars", "distill.optim.warmup_epochs": 1,
      "distill.optim.accumulate_steps": 2, "distill.optim.lr_scaling": "linear"},
     r"^distill.optim.warmup_epochs=1 leaves no decay steps with epochs=1 \(and "
     r"accumulate_steps=2 over 6 steps per epoch \(96 examples / batch_size=16\): 3 updates, "
     r"all warmup\); lower warmup_epochs below epochs or raise epochs$"),
    ({"pretrain.teacher.warmup_epochs": 2}, "pretrain.teacher.warmup_epochs=2 leaves no decay"),
    ({"pretrain.student.warmup_epochs": 1}, "pretrain.student.warmup_epochs=1 leaves no decay"),
    ({"teacher.optim.warmup_epochs": 1}, "teacher.optim.warmup_epochs=1 leaves no decay"),
    ({"identification.warmup_epochs": 1.5}, "identification.warmup_epochs=1.5 leaves no decay"),
    # no optimizer update at all
    ({"distill.optim.accumulate_steps": 7},
     r"distill.optim.accumulate_steps=7 with epochs=1 over 6 steps per epoch .* gives no "
     r"optimizer update \(6 micro-batches in all\); lower accumulate_steps to at most 6"),
    ({"pretrain.teacher.accumulate_steps": 3},
     "pretrain.teacher.accumulate_steps=3 .* no optimizer update"),
    # accumulate_steps above the steps of one epoch (with updates left)
    ({"teacher.optim.accumulate_steps": 8, "teacher.optim.epochs": 3},
     r"teacher.optim.accumulate_steps=8 exceeds the 6 steps per epoch .*lower accumulate_steps "
     r"to at most 6"),
    # a single update (k > steps / 2): the cosine part needs one more
    ({"identification.accumulate_steps": 4},
     r"identification.epochs=1 with accumulate_steps=4 over 6 steps per epoch .* gives 1 "
     r"update, .*lower accumulate_steps to at most 3"),
    # warmup_epochs < epochs, but rounding gives every update to the warmup
    ({"data.train_size": 160, "distill.optim.accumulate_steps": 3,
      "distill.optim.warmup_epochs": 0.9},
     r"distill.optim.warmup_epochs=0.9 rounds to 3 warmup updates of the 3 updates"),
    # no full batch
    ({"distill.optim.batch_size": 128},
     r"distill.optim.batch_size=128 is larger than the 96 examples of the training split"),
    ({"pretrain.size": 8}, r"^batch_size=16 is larger than the 8 examples of pretrain.size"),
    ({"teacher.optim.warmup_epochs": -0.5}, r"teacher.optim.warmup_epochs=-0.5 must be >= 0"),
])
def test_bad_schedules_are_refused_before_any_compute(overrides, match, tmp_path):
  with pytest.raises(ConfigError, match=match):
    validate_config(tiny_config(**overrides))
  with pytest.raises(ConfigError, match=match):
    train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert os.listdir(tmp_path) == []  # no config.json, no stage directory


def test_schedule_checks_use_the_steps_the_stage_trains_with():
  # Upsampling only adds steps: the un-upsampled size (an empty error set) is checked,
  # named as such when every method upsamples.
  with pytest.raises(ConfigError, match=r"6 steps per epoch \(96 examples / batch_size=16, "
                     r"before upsampling\)"):
    validate_config(tiny_config(**{"distill.methods": "dett", "distill.optim.accumulate_steps": 7}))
  # A stage's own batch size; a global batch (any number of processes).
  validate_config(tiny_config(**{"distill.optim.batch_size": 8,
                                 "distill.optim.accumulate_steps": 6}))
  # The built-in benchmark's exact training-split size (every group gets an example):
  # train_size=20 generates 22 examples, 2 batches of 11 (20 would give 1: one update).
  validate_config(tiny_config(**{"data.train_size": 20, "batch_size": 11}))
  with pytest.raises(ConfigError, match=r"over 2 steps per epoch \(22 examples / batch_size=11"):
    validate_config(tiny_config(**{"data.train_size": 20, "batch_size": 11,
                                   "teacher.optim.accumulate_steps": 2}))
  # Limits that still work are accepted: warmup just below epochs, one step per update.
  validate_config(tiny_config(**{f"{s}.warmup_epochs": 0.5 for s in (
      "pretrain.teacher", "pretrain.student", "teacher.optim", "identification", "distill.optim")}))
  validate_config(tiny_config(**{"distill.optim.accumulate_steps": 3,
                                 "distill.optim.warmup_epochs": 0.5}))


def test_schedules_of_stages_the_run_does_not_train_are_not_checked(tmp_path):
  bad = {"warmup_epochs": 1, "accumulate_steps": 99}
  def with_bad(stage, **more):
    return tiny_config(**{f"{stage}.{k}": v for k, v in bad.items()}, **more)
  validate_config(with_bad("pretrain.teacher", **{"pretrain.enabled": False}))
  validate_config(with_bad("pretrain.student", **{"student.init": str(tmp_path)}))
  validate_config(with_bad("pretrain.student", **{"distill.methods": ""}))
  validate_config(with_bad("teacher.optim", **{"teacher.checkpoint": str(tmp_path)}))
  validate_config(with_bad("identification", **{"distill.methods": "kd,erm,simkd"}))
  validate_config(with_bad("distill.optim", **{"distill.methods": ""}))
  with pytest.raises(ConfigError, match="identification.accumulate_steps=99"):
    validate_config(with_bad("identification", **{"distill.methods": "kd,jtt"}))


def test_sweep_values_that_change_a_schedule_are_checked():
  from conftest import load_config, override
  sweep = lambda **kw: override(load_config("ablation", "tiny"), **kw)
  validate_config(sweep(**{"sweep.axes.T_id": (1, 2, 3), "identification.warmup_epochs": 0.5}))
  with pytest.raises(ConfigError, match=r"^sweep.axes.T_id=1: identification.warmup_epochs=1 "
                     "leaves no decay steps with epochs=1"):
    validate_config(sweep(**{"sweep.axes.T_id": (2, 1), "identification.epochs": 2,
                             "identification.warmup_epochs": 1}))
  with pytest.raises(ConfigError, match=r"sweep.axes.T_id=0 must be >= 1"):
    validate_config(sweep(**{"sweep.axes.T_id": (0, 1)}))
  # A value the subset leaves out trains nothing.
  validate_config(sweep(**{"sweep.axes.T_id": (2, 1), "identification.epochs": 2,
                           "identification.warmup_epochs": 1, "sweep.subset": "T_id=2"}))
  with pytest.raises(ConfigError, match="distill.optim.accumulate_steps=7"):
    validate_config(sweep(**{"distill.optim.accumulate_steps": 7}))


def test_a_data_set_on_disk_is_checked_once_loaded(tmp_path):
  from conftest import load_config, override
  from dett_jax.data.metadata_csv import write_metadata_folder
  from dett_jax.data.synthetic import make_split
  from dett_jax.experiment import setup_context
  splits = {name: make_split(name, n, 16, 0, class_shapes=(3, 2))
            for name, n in (("train", 64), ("val", 32), ("test", 32))}
  root = write_metadata_folder(splits, str(tmp_path / "data"))
  config = override(load_config("waterbirds", "cpu"), **{
      "data.root": root, "data.image_size": 16, "data.eval_resize": 0, "batch_size": 16,
      "distill.optim.accumulate_steps": 5, "distill.methods": "kd"})
  validate_config(config)  # the training split's size is not known before loading it
  work = tmp_path / "run"
  n = len(splits["train"])  # 65: every group gets an example
  with pytest.raises(ConfigError, match=rf"distill.optim.accumulate_steps=5 exceeds the 4 steps "
                     rf"per epoch \({n} examples / batch_size=16\)"):
    setup_context(config, str(work))
  assert not (work / "config.json").exists()
  # warmup_epochs >= epochs fails for any size: refused before loading.
  config.distill.optim.update(accumulate_steps=1, warmup_epochs=8)
  with pytest.raises(ConfigError, match=r"warmup_epochs=8 leaves no decay steps with epochs=8 "
                     r"\(for any number of steps per epoch\)"):
    validate_config(config)


# get_config arguments of the config files that take one ("" / "default": none).
CONFIG_SETTINGS = {"ablation": ("full", "tiny"), "waterbirds": ("cpu",), "celeba": ("cpu",),
                   "synthetic_marks": ("tiny",)}


def _shipped_configs():
  """(name, get_config arguments) of every config file in configs/, with every setting."""
  import glob
  names = sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))
  return [(n, args) for n in names
          for args in [()] + [(s,) for s in CONFIG_SETTINGS.get(n, ())]]


def test_every_shipped_config_validates():
  from conftest import load_config, override
  from dett_jax.data import GENERATED
  from dett_jax.validation import check_schedules
  shipped = _shipped_configs()
  assert {n for n, _ in shipped} >= {"synthetic", "tiny", "ablation", "waterbirds", "celeba"}
  # Training-split sizes of the data sets on disk (Waterbirds, CelebA).
  train_sizes = {"waterbirds": 4795, "celeba": 162770}
  for name, args in shipped:
    config = load_config(name, *args)
    if config.data.name not in GENERATED:
      config = override(config, **{"data.root": "/data"})
    validate_config(config)
    if name in train_sizes:
      check_schedules(config, train_sizes[name])


def test_docs_name_exactly_the_fields_a_resume_may_change():
  import re
  from dett_jax.workdir import NON_RESULT_FIELDS
  readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "scaling.md")).read()
  start = readme.index("A run can resume with a different number of processes")
  paragraph = readme[start:readme.index("Tested on one", start)]
  named = set(re.findall(r"`([a-z_.]+)`", paragraph)) - {"config.json", "configs/tiny.py"}
  assert named == set(NON_RESULT_FIELDS)
