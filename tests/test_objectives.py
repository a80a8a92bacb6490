import jax.numpy as jnp
import numpy as np

from dett_jax import objectives


def test_feature_loss_matches_hand_computation():
  student = jnp.zeros((2, 1, 1, 2))
  teacher = jnp.array([[[[1.0, 3.0]]], [[[2.0, 0.0]]]])
  # Per example: mean((0-1)^2, (0-3)^2) = 5; mean(4, 0) = 2. Weights 3 and 1.
  loss = objectives.feature_loss(student, teacher, jnp.array([3.0, 1.0]))
  np.testing.assert_allclose(loss, (3 * 5 + 1 * 2) / 4, rtol=1e-6)


def test_feature_loss_ignores_zero_weight_and_pooled_shapes():
  s = jnp.array([[1.0, 1.0], [5.0, 5.0]])
  t = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(objectives.feature_loss(s, t, jnp.array([1.0, 0.0])), 1.0)


def test_kd_loss_zero_for_equal_logits_and_positive_otherwise():
  logits = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
  np.testing.assert_allclose(objectives.kd_loss(logits, logits, 3.0), 0.0, atol=1e-6)
  assert np.all(np.asarray(objectives.kd_loss(logits * 0, logits, 3.0)) > 0)


def test_kd_loss_scales_with_tau_squared_kl():
  s, t = jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 0.0]])
  tau = 2.0
  p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # softmax(t / tau)
  kl = np.sum(p * (np.log(p) - np.log([0.5, 0.5])))
  np.testing.assert_allclose(objectives.kd_loss(s, t, tau), [tau**2 * kl], rtol=1e-5)


def test_group_dro_update_upweights_the_worse_group():
  q = objectives.group_dro_update(jnp.full(3, 1 / 3), jnp.array([1.0, 2.0, 9.0]),
                                  jnp.array([True, True, False]), eta=0.5)
  assert q[1] > q[0] and np.isclose(float(q.sum()), 1.0)
  np.testing.assert_allclose(q[2] / q[0], np.exp(-0.5), rtol=1e-5)
