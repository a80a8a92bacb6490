"""Matching that sees the head (dett_head, dett_std) and the diagnostics that explain a
student's departure from its teacher (agreement, feature error, logit error, head
sensitivity): each against a hand computation, and each variant equal to plain DeTT
when switched off."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dett_jax import objectives
from dett_jax import methods
from dett_jax.methods import Models, matched_feature_loss
from dett_jax.evaluation import head_sensitivity, split_metrics
from dett_jax.report import write_report
from dett_jax.config_schema import complete
from dett_jax.sweep_axes import SweepError, check_sweep, method_of, variant_config
from dett_jax.training.steps import feature_diagnostics
from dett_jax.transplant import dense_apply

from conftest import load_config

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ml_collections.ConfigDict(dict(distill=dict(temperature=3.0, kd_ce_weight=0.0,
                                                     match="map", head_weight=0.7)))


def method_loss(name, student, teacher, batch, config, frozen=None):
  """(loss, parts) of method `name` given the student's and the teacher's outputs."""
  batch = {**batch, "teacher_feature_map": teacher["feature_map"],
           "teacher_logits": teacher["logits"]}
  return methods.get(name)(Models(student=None), config).objective(student, batch, frozen or {})


def _case(seed=0, b=6, c=5, k=3):
  rng = np.random.default_rng(seed)
  head = {"kernel": jnp.asarray(rng.normal(size=(c, k)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=k), jnp.float32)}
  s_map = jnp.asarray(rng.normal(size=(b, 2, 2, c)), jnp.float32)
  t_map = jnp.asarray(rng.normal(size=(b, 2, 2, c)) * [3.0, 1.0, 0.1, 0.5, 2.0], jnp.float32)
  weights = jnp.asarray(rng.choice([1.0, 4.0], b), jnp.float32)
  student = {"projected": s_map, "logits": dense_apply(head, s_map.mean((1, 2)))}
  teacher = {"feature_map": t_map, "logits": dense_apply(head, t_map.mean((1, 2)))}
  return head, student, teacher, weights


def diag_batch(teacher, groups, mask):
  return {"group": groups, "mask": mask, "teacher_feature_map": teacher["feature_map"],
          "teacher_logits": teacher["logits"]}


def test_head_space_loss_matches_hand_computation():
  s = np.array([[1.0, -1.0, 2.0], [0.0, 3.0, 1.0]])
  t = np.array([[0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
  w = np.array([2.0, 1.0])
  per_example = ((s - t) ** 2).mean(1)  # [2/3, 5/3]
  expected = (w * per_example).sum() / w.sum()
  np.testing.assert_allclose(objectives.head_space_loss(jnp.asarray(s), jnp.asarray(t),
                                                         jnp.asarray(w)), expected, rtol=1e-6)


def test_standardized_feature_loss_matches_hand_computation():
  _, student, teacher, weights = _case()
  scale = np.array([1 / 3.0, 1.0, 10.0, 2.0, 0.5], np.float32)
  s, t, w = (np.asarray(x, np.float64) for x in (student["projected"], teacher["feature_map"],
                                                  weights))
  per_example = (((s - t) * scale) ** 2).reshape(len(w), -1).mean(1)
  loss = matched_feature_loss(student["projected"], teacher["feature_map"], weights,
                              scale=jnp.asarray(scale))
  np.testing.assert_allclose(loss, (w * per_example).sum() / w.sum(), rtol=1e-5)


def test_dett_head_loss_is_feature_loss_plus_weighted_head_term():
  head, student, teacher, weights = _case()
  batch = {"weight": weights, "mask": jnp.ones_like(weights)}
  loss, parts = method_loss("dett_head", student, teacher, batch, CONFIG)
  feature = objectives.feature_loss(student["projected"], teacher["feature_map"], weights)
  head_term = objectives.head_space_loss(student["logits"], teacher["logits"], weights)
  np.testing.assert_allclose(parts["head_loss"], head_term, rtol=1e-6)
  np.testing.assert_allclose(loss, feature + 0.7 * head_term, rtol=1e-6)
  assert float(head_term) > 0


@pytest.mark.parametrize("variant", ["dett_head", "dett_std"])
def test_each_variant_switched_off_is_plain_dett(variant):
  """dett_head with head_weight=0 and dett_std with a unit scale give DeTT's loss (1e-6)."""
  _, student, teacher, weights = _case(seed=3)
  batch = {"weight": weights, "mask": jnp.ones_like(weights)}
  plain, _ = method_loss("dett", student, teacher, batch, CONFIG)
  off = ml_collections.ConfigDict(CONFIG.to_dict())
  off.distill.head_weight = 0.0
  frozen = {"feature_scale": jnp.ones(5)}
  loss, _ = method_loss(variant, student, teacher, batch, off, frozen)
  np.testing.assert_allclose(loss, plain, rtol=1e-6)
  # ...and switched on, they differ.
  on = {"feature_scale": jnp.linspace(0.2, 3.0, 5)}
  loss_on, _ = method_loss(variant, student, teacher, batch, CONFIG, on)
  assert abs(float(loss_on) - float(plain)) > 1e-3


def test_dett_std_without_a_scale_is_refused():
  _, student, teacher, weights = _case()
  batch = {"weight": weights, "mask": jnp.ones_like(weights)}
  with pytest.raises(KeyError, match="feature_scale"):
    method_loss("dett_std", student, teacher, batch, CONFIG, {})


def test_variants_differ_from_dett_only_in_their_matching():
  dett = methods.get("dett")
  for name in ("dett_head", "dett_std"):
    cls = methods.get(name)
    assert issubclass(cls, dett) and (cls.head_term, cls.standardize) != (False, False)
    assert (cls.needs_teacher, cls.reweight, cls.transplant, cls.student_head) == (
        dett.needs_teacher, dett.reweight, dett.transplant, dett.student_head)


def test_logit_error_and_feature_error_match_hand_computation():
  head, student, teacher, _ = _case(seed=1, b=8)
  groups = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)  # the last one is padding
  sums = jax.tree.map(np.asarray, feature_diagnostics(student, diag_batch(teacher, groups, mask),
                                                      {"teacher_head": head}, 4))
  sums["count"] = np.bincount(np.asarray(groups), weights=np.asarray(mask), minlength=4)
  sums["correct"] = sums["count"]
  metrics = split_metrics(sums, np.ones(4), "test", 2)
  keep = np.asarray(mask) > 0
  g = np.asarray(groups)[keep]
  s_map, t_map = np.asarray(student["projected"])[keep], np.asarray(teacher["feature_map"])[keep]
  w, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
  t_logits = t_map.mean((1, 2)) @ w + bias
  s_logits = s_map.mean((1, 2)) @ w + bias
  logit_err = ((s_logits - t_logits) ** 2).sum(1)
  logit_spread = ((t_logits - t_logits.mean(0)) ** 2).sum(1)
  feat_err = ((s_map - t_map) ** 2).reshape(len(g), -1).sum(1)
  feat_spread = ((t_map - t_map.mean(0)) ** 2).reshape(len(g), -1).sum(1)
  np.testing.assert_allclose(metrics["test/logit_error"], logit_err.sum() / logit_spread.sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["test/feature_error"], feat_err.sum() / feat_spread.sum(),
                             rtol=1e-4)
  for group in range(4):
    sel = g == group
    np.testing.assert_allclose(metrics[f"test/logit_error/group_{group // 2}_{group % 2}"],
                               logit_err[sel].sum() / logit_spread[sel].sum(), rtol=1e-4)


def test_logit_error_is_zero_when_the_head_ignores_the_differing_direction():
  """A feature error in a direction the head does not read is no logit error."""
  head, _, teacher, _ = _case(seed=2, b=4, c=5, k=2)
  kernel = np.asarray(head["kernel"]).copy()
  kernel[4] = 0.0  # the head ignores channel 4
  head = {"kernel": jnp.asarray(kernel), "bias": head["bias"]}
  t_map = teacher["feature_map"]
  s_map = t_map.at[..., 4].add(5.0)  # a large error in channel 4 only
  teacher = {"feature_map": t_map, "logits": dense_apply(head, t_map.mean((1, 2)))}
  student = {"projected": s_map}
  sums = jax.tree.map(np.asarray, feature_diagnostics(
      student, diag_batch(teacher, jnp.zeros(4, jnp.int32), jnp.ones(4)), {"teacher_head": head}, 1))
  assert float(sums["logit_sq_err"][0]) < 1e-8 and float(sums["feat_sq_err"][0]) > 1.0
  sensitivity = head_sensitivity({**sums, "count": np.array([4.0])}, head)
  assert sensitivity["head_weight"][4] == 0.0 and sensitivity["student_rmse"][4] == pytest.approx(5.0)
  np.testing.assert_allclose(sensitivity["student_rmse"][:4], 0.0, atol=1e-6)
  t_pool = np.asarray(t_map).mean((1, 2))
  np.testing.assert_allclose(sensitivity["teacher_std"], t_pool.std(0), rtol=1e-4, atol=1e-6)


def test_report_has_logit_error_and_a_head_sensitivity_plot(tmp_path):
  data = {"split": "val", "head_weight": [1.0, 0.0, 0.5], "teacher_std": [0.1, 2.0, 0.3],
          "student_rmse": [0.2, 0.1, 0.3], "reading": [0.1, 0.0, 0.15]}
  results = {"models": {
      "teacher_dfr": {"role": "teacher", "method": "dfr",
                      "metrics": {"test/worst_group_acc": 0.8}},
      "student_dett": {"role": "student", "method": "dett", "head_sensitivity": data,
                       "metrics": {"test/worst_group_acc": 0.5, "test/agreement": 0.6,
                                   "test/feature_error": 0.26, "test/logit_error": 1.7}}}}
  write_report(results, str(tmp_path))
  report = (tmp_path / "report.md").read_text()
  assert "| logit error |" in report
  assert "1.700" in report and "student_dett/head_sensitivity.png" in report
  assert (tmp_path / "student_dett" / "head_sensitivity.png").stat().st_size > 1000


def test_sweep_axes_method_head_weight_and_epochs():
  config = load_config("ablation", "tiny")
  config.sweep.axes = ml_collections.ConfigDict(dict(method=("dett", "dett_head"),
                                                     head_weight=(0.5,), epochs=(1, 2)))
  assert len(check_sweep(complete(config))) == 4
  variant = {"method": "dett_head", "head_weight": 0.5, "epochs": 2}
  assert method_of(config, variant) is methods.get("dett_head")
  cfg = variant_config(config, variant)
  assert cfg.distill.head_weight == 0.5 and cfg.distill.optim.epochs == 2
  config.sweep.axes.method = ("dett", "nope")
  with pytest.raises(SweepError, match="unknown method"):
    check_sweep(complete(config))


def test_pipeline_trains_the_variants_and_writes_their_diagnostics(tmp_path):
  """configs/tiny.py with dett, dett_head and dett_std: every student's results carry
  agreement, feature and logit error per group, metrics.jsonl has them per epoch."""
  out = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.pretrain.enabled=False",
                        "--config.distill.methods=dett,dett_head,dett_std"],
                       cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))["models"]
  for name in ("student_dett", "student_dett_head", "student_dett_std"):
    metrics = results[name]["metrics"]
    for key in ("test/agreement", "test/feature_error", "test/logit_error",
                "val/logit_error/group_0_0"):
      assert key in metrics, (name, key)
    assert (tmp_path / name / "head_sensitivity.png").exists()
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any("val/logit_error" in r and r["stage"] == "student_dett_head" for r in logged)
  # The variants train other objectives than DeTT's from the same start.
  assert results["student_dett_head"]["metrics"] != results["student_dett"]["metrics"]


def test_equal_tuning_picks_each_methods_grid_point_by_validation_only(tmp_path):
  """A constructed grid where test would pick the other learning rate for every method."""
  from dett_jax.study import write_study
  runs = []
  for method in ("dett", "kd_up"):
    for lr, val, test in ((1e-3, 0.8, 0.5), (3e-3, 0.6, 0.9)):
      for seed in (0, 1):
        runs.append({"name": f"{method}-{lr}-{seed}", "seed": seed,
                     "variant": {"method": method, "learning_rate": lr},
                     "metrics": {"val/worst_group_acc": val + 0.01 * seed, "val/avg_acc": 0.9,
                                 "val/adj_avg_acc": 0.9, "test/worst_group_acc": test,
                                 "test/avg_acc": 0.9, "test/adj_avg_acc": 0.9}})
  study = write_study(runs, {"method": ["dett", "kd_up"], "learning_rate": [1e-3, 3e-3]},
                      str(tmp_path))
  for method in ("dett", "kd_up"):
    chosen = study["best_per_method"][method]
    assert chosen["variant"] == {"method": method, "learning_rate": 1e-3}
    assert chosen["metrics"]["test/worst_group_acc"]["mean"] == pytest.approx(0.5)
  assert "## Best per method" in (tmp_path / "study.md").read_text()
