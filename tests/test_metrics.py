"""Tests for dett_jax.metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dett_jax import metrics


def test_group_name():
  assert metrics.group_name(0) == "group_0_0"
  assert metrics.group_name(3) == "group_1_1"
  assert metrics.group_name(2) == "group_1_0"
  assert metrics.group_name(5, num_attrs=3) == "group_1_2"


def test_group_sums_with_mask_under_jit():
  values = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0, 2.0])
  groups = jnp.array([0, 1, 1, 3, 2, 0])
  mask = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # Example 4 is padding.
  fn = jax.jit(metrics.group_sums, static_argnums=3)
  sums = np.asarray(fn(values, groups, mask, 4))
  np.testing.assert_allclose(sums, [3.0, 1.0, 0.0, 1.0])
  counts = np.asarray(fn(jnp.ones_like(values), groups, mask, 4))
  np.testing.assert_allclose(counts, [2.0, 2.0, 0.0, 1.0])


def test_accumulator_adds_named_sums():
  acc = metrics.GroupAccumulator()
  acc.update(correct=np.array([1.0, 2.0]), count=jnp.array([2.0, 3.0]))
  acc.update(correct=np.array([0.5, 1.0]), count=np.array([1.0, 1.0]))
  totals = acc.totals()
  assert set(totals) == {"correct", "count"}
  np.testing.assert_allclose(totals["correct"], [1.5, 3.0])
  np.testing.assert_allclose(totals["count"], [3.0, 4.0])
  assert totals["correct"].dtype == np.float64
  totals["correct"][0] = 100.0  # Returned arrays must not alias the state.
  np.testing.assert_allclose(acc.totals()["correct"], [1.5, 3.0])
  with pytest.raises(ValueError):
    acc.update(correct=np.zeros(3))


def test_group_accuracy_metrics_hand_computed():
  correct = np.array([9.0, 3.0, 0.0, 40.0])
  count = np.array([10.0, 4.0, 0.0, 50.0])  # group_1_0 absent from split.
  train_counts = np.array([100.0, 10.0, 20.0, 70.0])
  out = metrics.group_accuracy_metrics(
      correct, count, train_counts, split="test")
  assert out["test/acc/group_0_0"] == pytest.approx(0.9)
  assert out["test/acc/group_0_1"] == pytest.approx(0.75)
  assert out["test/acc/group_1_1"] == pytest.approx(0.8)
  assert "test/acc/group_1_0" not in out
  assert out["test/worst_group_acc"] == pytest.approx(0.75)
  assert out["test/avg_acc"] == pytest.approx(52.0 / 64.0)
  # Absent group's train count (20) excluded from the denominator.
  expected_adj = (100 * 0.9 + 10 * 0.75 + 70 * 0.8) / (100 + 10 + 70)
  assert out["test/adj_avg_acc"] == pytest.approx(expected_adj)
  assert set(out) == {
      "test/acc/group_0_0", "test/acc/group_0_1", "test/acc/group_1_1",
      "test/worst_group_acc", "test/avg_acc", "test/adj_avg_acc"}
  assert all(isinstance(v, float) for v in out.values())


def test_group_accuracy_metrics_absent_group_not_worst():
  # The absent group would be worst (0 correct) if it were not excluded.
  out = metrics.group_accuracy_metrics(
      np.array([2.0, 0.0, 1.0, 4.0]), np.array([2.0, 0.0, 2.0, 4.0]),
      np.ones(4), split="val")
  assert out["val/worst_group_acc"] == pytest.approx(0.5)
  assert out["val/adj_avg_acc"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)


def test_group_accuracy_metrics_empty_raises():
  with pytest.raises(ValueError):
    metrics.group_accuracy_metrics(
        np.zeros(4), np.zeros(4), np.ones(4), split="test")


def test_group_ratio_metrics():
  out = metrics.group_ratio_metrics(
      np.array([3.0, 0.0, 2.0, 5.0]), np.array([4.0, 0.0, 2.0, 10.0]),
      split="test", name="agreement")
  assert out == pytest.approx({
      "test/agreement/group_0_0": 0.75,
      "test/agreement/group_1_0": 1.0,
      "test/agreement/group_1_1": 0.5,
      "test/agreement": 10.0 / 16.0,
  })
  assert "test/agreement/group_0_1" not in out
