"""Losses: the DeTT weighted feature loss, Hinton KD, weighted cross-entropy, group DRO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weighted_mean(values: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """sum_i w_i v_i / sum_i w_i (0 when all weights are 0, e.g. padding)."""
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


def feature_loss(student_features: jnp.ndarray, teacher_features: jnp.ndarray,
                 weights: jnp.ndarray) -> jnp.ndarray:
  """DeTT loss: sum_i w_i * mean_{h,w,c} (p(f_S(x_i)) - f_T(x_i))^2 / sum_i w_i.

  Args:
    student_features: projected student features `[b, h, w, c]` (or `[b, c]` pooled).
    teacher_features: teacher features of the same shape (gradients are stopped).
    weights: per-example weights `[b]` (error-set weights; 0 for padding).

  Returns:
    The scalar loss (float32; 0 when all weights are 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import feature_loss
    >>> student_map = jnp.zeros((2, 4, 4, 8))
    >>> teacher_map = jnp.ones((2, 4, 4, 8)) * jnp.array([1.0, 2.0])[:, None, None, None]
    >>> float(feature_loss(student_map, teacher_map, weights=jnp.array([1.0, 3.0])))  # (1 + 3 * 4) / 4
    3.25
  """
  diff = student_features.astype(jnp.float32) - jax.lax.stop_gradient(
      teacher_features.astype(jnp.float32))
  per_example = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
  return weighted_mean(per_example, weights)


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
            temperature: float = 3.0) -> jnp.ndarray:
  """Per-example Hinton loss tau^2 * KL(softmax(t/tau) || softmax(s/tau)).

  Args:
    student_logits: `[b, k]`.
    teacher_logits: `[b, k]` (gradients are stopped).
    temperature: tau (DeTT's KD baselines use 3).

  Returns:
    float32 `[b]`; average it with the example weights (e.g. `jnp.mean`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import kd_loss
    >>> losses = kd_loss(jnp.array([[0.0, 1.0], [2.0, 0.0]]), jnp.array([[1.0, 0.0], [2.0, 0.0]]))
    >>> [round(float(x), 3) for x in losses]         # [b]; 0 where student and teacher agree
    [0.495, 0.0]
  """
  t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  return temperature**2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Per-example softmax cross-entropy `[b]` for integer labels `[b]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def group_dro_update(q: jnp.ndarray, group_losses: jnp.ndarray, group_present: jnp.ndarray,
                     eta: float) -> jnp.ndarray:
  """q_g <- q_g * exp(eta * L_g) for groups in the batch, then normalised. `[G]`."""
  q = q * jnp.exp(eta * jnp.where(group_present, group_losses, 0.0))
  return q / jnp.sum(q)
