"""Tests for dett_jax.dfr (Deep Feature Reweighting last-layer retraining)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dett_jax import dfr

NUM_NOISE = 8


def _spurious_data(
    counts: tuple[int, int, int, int], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Biased linear problem; counts per group g = 2 * y + a.

  Feature 0 is the (noisy) core feature, feature 1 the (nearly noiseless,
  large) spurious attribute, the rest pure noise.
  """
  rng = np.random.default_rng(seed)
  groups = np.repeat(np.arange(4), counts)
  y, a = groups // 2, groups % 2
  n = groups.size
  core = (2 * y - 1) + 0.8 * rng.standard_normal(n)
  spurious = 3.0 * (2 * a - 1) + 0.1 * rng.standard_normal(n)
  noise = rng.standard_normal((n, NUM_NOISE))
  x = np.column_stack([core, spurious, noise]).astype(np.float32)
  perm = rng.permutation(n)
  return x[perm], y[perm], groups[perm]


def _dense_predict(kernel: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
  return np.argmax(x @ kernel + bias, axis=1)


def _standardized_logits(x, w, b, mean, std):
  return ((x - mean) / std) @ w + b


def test_dfr_fixes_spurious_correlation():
  x_test, y_test, g_test = _spurious_data((2000, 2000, 2000, 2000), seed=1)

  # Biased baseline: weak-L1 logistic regression on a 95%-correlated set.
  x_tr, y_tr, g_tr = _spurious_data((950, 50, 50, 950), seed=2)
  mean, std = dfr.standardization_stats(x_tr)
  w, b = dfr.fit_logistic_l1((x_tr - mean) / std, y_tr, c=100.0, num_classes=2)
  kernel, bias = dfr.fold_standardization(w, b, mean, std, num_classes=2)
  biased_wga = dfr.worst_group_accuracy(
      _dense_predict(kernel, bias, x_test), y_test, g_test)

  # DFR on an imbalanced held-out set that contains all four groups.
  x_val, y_val, g_val = _spurious_data((400, 40, 40, 400), seed=3)
  result = dfr.fit_dfr(x_val, y_val, g_val, num_classes=2, num_refits=5, seed=0)
  dfr_wga = dfr.worst_group_accuracy(
      _dense_predict(result.kernel, result.bias, x_test), y_test, g_test)

  assert biased_wga < 0.65, biased_wga
  assert dfr_wga >= 0.8, dfr_wga
  assert dfr_wga - biased_wga >= 0.2, (dfr_wga, biased_wga)
  assert result.kernel.shape == (2 + NUM_NOISE, 2)
  assert result.kernel.dtype == np.float32
  assert result.bias.shape == (2,)
  assert result.num_balanced == 40
  assert set(result.c_scores) == set(dfr.DEFAULT_C_GRID)
  assert result.best_c in result.c_scores
  assert result.c_scores[result.best_c] == max(result.c_scores.values())
  # DFR leans on the core feature rather than the spurious one.
  assert abs(result.kernel[0, 1]) > 3 * abs(result.kernel[1, 1])


def test_fit_dfr_is_deterministic():
  x, y, g = _spurious_data((60, 10, 10, 60), seed=4)
  r1 = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=(1.0, 0.1), num_refits=2)
  r2 = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=(1.0, 0.1), num_refits=2)
  np.testing.assert_array_equal(r1.kernel, r2.kernel)
  np.testing.assert_array_equal(r1.bias, r2.bias)
  assert r1.c_scores == r2.c_scores


@pytest.mark.parametrize("num_classes", [2, 3])
def test_folded_dense_matches_standardized_model(num_classes):
  rng = np.random.default_rng(0)
  d, k = 6, (1 if num_classes == 2 else num_classes)
  x = rng.standard_normal((50, d)).astype(np.float32) * 3 + 2
  w = rng.standard_normal((d, k)).astype(np.float32)
  b = rng.standard_normal(k).astype(np.float32)
  mean = rng.standard_normal(d)
  std = rng.uniform(0.5, 2.0, d)
  kernel, bias = dfr.fold_standardization(w, b, mean, std, num_classes)
  ref = _standardized_logits(x, w, b, mean, std)

  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  logits = np.asarray(nn.Dense(num_classes).apply({"params": params}, x))
  assert logits.shape == (50, num_classes)
  if num_classes == 2:
    np.testing.assert_allclose(logits[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(logits[:, 1], ref[:, 0], atol=1e-4)
    probs = np.asarray(jax.nn.softmax(logits, axis=1))
    np.testing.assert_allclose(
        probs[:, 1], 1 / (1 + np.exp(-ref[:, 0])), atol=1e-5)
  else:
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_dense_params_plug_into_flax_dense():
  x, y, g = _spurious_data((60, 10, 10, 60), seed=5)
  result = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=(1.0,), num_refits=2)
  params = dfr.dense_params(result)
  assert set(params) == {"kernel", "bias"}
  logits = nn.Dense(2).apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(
      np.asarray(logits), x @ result.kernel + result.bias, atol=1e-4)


def test_l1_zeroes_noise_dims_for_small_c():
  x, y, _ = _spurious_data((100, 100, 100, 100), seed=6)
  mean, std = dfr.standardization_stats(x)
  xs = (x - mean) / std
  w_small, _ = dfr.fit_logistic_l1(xs, y, c=0.05, num_classes=2)
  w_large, _ = dfr.fit_logistic_l1(xs, y, c=100.0, num_classes=2)
  assert w_small.shape == (2 + NUM_NOISE, 1)
  assert w_small[0, 0] > 0  # the core feature survives
  assert np.sum(w_small[2:, 0] == 0) >= NUM_NOISE - 1
  assert np.sum(w_large[2:, 0] == 0) <= 2  # weak L1 keeps the noise dims


def test_fit_logistic_l1_satisfies_optimality_conditions():
  rng = np.random.default_rng(7)
  n, d, c = 300, 12, 0.2
  x = rng.standard_normal((n, d)).astype(np.float32)
  y = (x[:, 0] - x[:, 1] + rng.logistic(size=n) > 0).astype(np.int64)
  w, b = dfr.fit_logistic_l1(x, y, c=c, num_classes=2)
  z = x.astype(np.float64) @ w[:, 0] + b[0]
  resid = 1 / (1 + np.exp(-z)) - y
  grad = x.T.astype(np.float64) @ resid / n
  lam = 1 / (c * n)
  nz = w[:, 0] != 0
  assert abs(resid.mean()) < 1e-4  # unpenalised intercept
  np.testing.assert_allclose(grad[nz], -lam * np.sign(w[nz, 0]), atol=1e-3 * lam)
  assert np.all(np.abs(grad[~nz]) <= lam * (1 + 1e-3))


def test_multinomial_separable_problem():
  rng = np.random.default_rng(8)
  centers = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
  y = rng.integers(0, 3, 600)
  x = np.concatenate(
      [centers[y] + 0.5 * rng.standard_normal((600, 2)),
       rng.standard_normal((600, 3))], axis=1).astype(np.float32)
  mean, std = dfr.standardization_stats(x[:300])
  w, b = dfr.fit_logistic_l1((x[:300] - mean) / std, y[:300], c=1.0, num_classes=3)
  assert w.shape == (5, 3) and b.shape == (3,)
  kernel, bias = dfr.fold_standardization(w, b, mean, std, num_classes=3)
  acc = np.mean(_dense_predict(kernel, bias, x[300:]) == y[300:])
  assert acc >= 0.9, acc

  groups = y * 2 + (x[:, 3] > 0)
  result = dfr.fit_dfr(x[:300], y[:300], groups[:300], num_classes=3,
                       c_grid=(1.0, 0.1), num_refits=2)
  assert result.kernel.shape == (5, 3)
  acc = np.mean(_dense_predict(result.kernel, result.bias, x[300:]) == y[300:])
  assert acc >= 0.9, acc


def test_error_mismatched_lengths():
  x, y, g = _spurious_data((10, 10, 10, 10), seed=9)
  with pytest.raises(ValueError, match="matching lengths"):
    dfr.fit_dfr(x, y[:-1], g, num_classes=2)
  with pytest.raises(ValueError, match="matching lengths"):
    dfr.fit_dfr(x, y, g[:-1], num_classes=2)


def test_error_fewer_than_two_classes():
  x, y, g = _spurious_data((10, 10, 10, 10), seed=9)
  only0 = y == 0
  with pytest.raises(ValueError, match="Fewer than 2 classes"):
    dfr.fit_dfr(x[only0], y[only0], g[only0], num_classes=2)


def test_error_class_without_examples():
  x, y, g = _spurious_data((10, 10, 10, 10), seed=9)
  with pytest.raises(ValueError, match=r"Classes \[2\] have no example"):
    dfr.fit_dfr(x, y, g, num_classes=3)


def test_error_tiny_group():
  x, y, g = _spurious_data((10, 1, 10, 10), seed=9)
  with pytest.raises(ValueError, match="smallest group present has 1"):
    dfr.fit_dfr(x, y, g, num_classes=2)
