"""Tests for dett_jax.curves (curves.png / study_curves.png) from hand-written metrics logs;
no training."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from dett_jax import curves, report
from dett_jax import study as study_lib
from dett_jax.training import loop

PNG = b"\x89PNG\r\n\x1a\n"


def _write_log(workdir, records, tail: str = "") -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def _done(workdir, stage, record) -> None:
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  with open(os.path.join(workdir, stage, "done.json"), "w", encoding="utf-8") as f:
    json.dump(record, f)


def _pipeline_log() -> list[dict]:
  """Two epochs of 4 steps, logged every 2 steps; the student evaluates each epoch."""
  records = []
  for stage, evaluates in (("teacher_erm", False), ("student_dett", True)):
    for step in (2, 4, 6, 8):
      records.append({"stage": stage, "step": step, "loss": 1.0 / step, "grad_norm": 1.0})
      if evaluates and step % 4 == 0:
        records.append({"stage": stage, "step": step, "val/worst_group_acc": step / 10})
  return records


def _results() -> dict:
  metrics = {"test/worst_group_acc": 0.5, "test/acc/group_0_0": 0.5, "test/acc/group_1_1": 0.9}
  return {"models": {"teacher_erm": {"role": "teacher", "method": "erm", "metrics": metrics}}}


def test_stage_curves_are_per_epoch(tmp_path):
  _write_log(tmp_path, _pipeline_log(), tail='{"stage": "student_dett", "st')  # cut short
  _done(tmp_path, "teacher_erm", {"history": [{"epoch": 1, "step": 4}, {"epoch": 2, "step": 8}]})
  panels = {p.name: p for p in curves.stage_curves(
      str(tmp_path), curves.read_metrics(str(tmp_path / "metrics.jsonl")))}
  assert list(panels) == ["teacher_erm", "student_dett"]
  for name in panels:  # epoch 1: steps 2 and 4; epoch 2: steps 6 and 8
    xs, ys = panels[name].losses["loss"]
    assert panels[name].xlabel == "epoch"
    np.testing.assert_allclose(xs, [1, 2])
    np.testing.assert_allclose(ys, [(1 / 2 + 1 / 4) / 2, (1 / 6 + 1 / 8) / 2])
  assert panels["teacher_erm"].val is None
  np.testing.assert_allclose(panels["student_dett"].val[0], [1, 2])  # E from the val steps
  np.testing.assert_allclose(panels["student_dett"].val[1], [0.4, 0.8])


def test_report_shows_curves_inline(tmp_path):
  _write_log(tmp_path, _pipeline_log())
  report.write_report(_results(), str(tmp_path))
  assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
  text = (tmp_path / "report.md").read_text(encoding="utf-8")
  assert "![training curves](curves.png)" in text and "[curves.png](curves.png)" in text
  assert "![test accuracy per group](groups.png)" in text and "[groups.png](groups.png)" in text


@pytest.mark.parametrize("log", [None, "", "not json\n{\"stage\": 3}\n"])
def test_no_log_no_curves(tmp_path, log):
  if log is not None:
    (tmp_path / "metrics.jsonl").write_text(log, encoding="utf-8")
  report.write_report(_results(), str(tmp_path))
  assert not (tmp_path / "curves.png").exists()
  text = (tmp_path / "report.md").read_text(encoding="utf-8")
  assert "curves.png" not in text
  assert "![test accuracy per group](groups.png)" in text


def _sweep_log(stage: str) -> list[dict]:
  """A stacked group of 2 variants: 2 epochs of 2 steps, as `loop._flush` logs them."""
  return [{"stage": "teacher_erm", "step": 2, "loss": 0.7}] + [
      {"stage": stage, "step": step, "loss": 1.5 / step, "epoch": float(-(-step // 2)),
       "loss/variant_0": 1.0 / step, "loss/variant_1": 2.0 / step} for step in (1, 2, 3, 4)]


def test_study_curves_per_variant(tmp_path):
  stage = "sweep_projector=linear_1234abcd"
  _write_log(tmp_path, _sweep_log(stage))
  _done(tmp_path, stage, {"runs": [{"name": "lambda_up=1"}, {"name": "lambda_up=5"}]})
  runs = [{"name": f"lambda_up={l}", "variant": {"lambda_up": l}, "seed": 0,
           "metrics": {"val/worst_group_acc": 0.5}} for l in (1, 5)]
  study_lib.write_study(runs, {"lambda_up": [1, 5]}, str(tmp_path))
  assert (tmp_path / "study_curves.png").read_bytes()[:8] == PNG
  text = (tmp_path / "study.md").read_text(encoding="utf-8")
  assert "![training curves](study_curves.png)" in text
  assert "![worst-group accuracy per axis](study.png)" in text
  panels = {p.name: p for p in curves.stage_curves(
      str(tmp_path), curves.read_metrics(str(tmp_path / "metrics.jsonl")))}
  group = panels[stage]
  assert list(group.losses) == ["lambda_up=1", "lambda_up=5"]  # per variant, named by done.json
  np.testing.assert_allclose(group.losses["lambda_up=1"][0], [1, 2])
  np.testing.assert_allclose(group.losses["lambda_up=5"][1], [(2 + 1) / 2, (2 / 3 + 1 / 2) / 2])
  assert panels["teacher_erm"].xlabel == "step"  # no epoch known: x is the step


def test_flush_logs_each_stacked_variant(tmp_path):
  """`loop._flush` adds `loss/variant_<i>` and `epoch` for `[k]` metrics (a variant's
  non-finite step left out of its mean), and nothing for a single model."""
  written = []
  logger = types.SimpleNamespace(write=lambda stage, step, m: written.append((step, m)))
  bar = types.SimpleNamespace(set_postfix=lambda **_: None)
  spec = types.SimpleNamespace(name="s", host_metrics=None, steps_per_epoch=4, on_nonfinite="skip")
  stage = types.SimpleNamespace(spec=spec, logger=logger, bar=bar)

  def flush(pending):
    run = types.SimpleNamespace(pending=pending, meta={"skipped_steps": []}, window_start=0.0)
    loop._flush(stage, run)
    return written[-1]

  no = np.zeros(2, np.float32)  # the flags are floats, as `training.update` makes them
  stacked = [(4, {"loss": np.array([1.0, 2.0]), "grad_norm": np.ones(2),
                  "nonfinite_loss": no, "nonfinite_grad": no}),
             (5, {"loss": np.array([3.0, np.nan]), "grad_norm": np.ones(2),
                  "nonfinite_loss": np.array([0.0, 1.0], np.float32),
                  "nonfinite_grad": no})]
  step, m = flush(stacked)
  assert step == 6 and m["epoch"] == 2.0
  assert m["loss/variant_0"] == 2.0 and m["loss/variant_1"] == 2.0
  single = [(0, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0),
                 "nonfinite_loss": np.float32(0.0), "nonfinite_grad": np.float32(0.0)})]
  _, m = flush(single)
  assert set(m) == {"loss", "grad_norm", "steps_per_sec", "skipped_steps"}
