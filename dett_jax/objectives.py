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


def head_space_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                    weights: jnp.ndarray) -> jnp.ndarray:
  """sum_i w_i * mean_k (h_T(p(f_S(x_i)))_k - h_T(f_T(x_i))_k)^2 / sum_i w_i: the feature
  error seen through the transplanted head (`dett_head`'s added term).

  Args:
    student_logits: `[b, k]`, the transplanted head on the pooled projected student map.
    teacher_logits: `[b, k]`, the same head on the teacher's pooled features (gradients
      are stopped).
    weights: per-example weights `[b]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax.objectives import head_space_loss
    >>> float(head_space_loss(jnp.array([[0.0, 2.0], [1.0, 1.0]]), jnp.zeros((2, 2)),
    ...                       weights=jnp.array([1.0, 1.0])))  # ((0 + 4) / 2 + (1 + 1) / 2) / 2
    1.5
  """
  diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(
      teacher_logits.astype(jnp.float32))
  return weighted_mean(jnp.mean(jnp.square(diff), axis=-1), weights)


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


def group_dro_adjustment(group_counts, c: float) -> jnp.ndarray:
  """The generalisation adjustment C / sqrt(n_g) `[G]` of Sagawa et al. (2020) from the
  training group counts n_g (a group without training examples counts as 1)."""
  counts = jnp.maximum(jnp.asarray(group_counts, jnp.float32), 1.0)
  return jnp.float32(c) / jnp.sqrt(counts)


def group_dro_loss(losses: jnp.ndarray, groups: jnp.ndarray, mask: jnp.ndarray, q: jnp.ndarray,
                   eta: float = 0.01, adjustment: jnp.ndarray | None = None
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Online group DRO (Sagawa et al. 2020; the group_DRO code's `LossComputer`).

  L_g = sum_i m_i l_i [g_i = g] / sum_i m_i [g_i = g] (the mean loss of group g in the
  batch), for the groups present in it (sum_i m_i [g_i = g] > 0); then
  q_new_g = q_g * exp(eta * (L_g + adj_g)) for present groups (absent groups keep
  q_g), normalised over all groups; loss = sum_{g present} q_new_g * L_g.

  As in the group_DRO code, the loss is not renormalised over the present groups: an
  absent group's L_g counts as 0, so its weight's mass is simply missing from this
  batch's loss. Unlike that code, an absent group is not updated at all: the code
  multiplies it by exp(eta * adj_g), which upweights groups for not being sampled; with
  adjustment 0 (the default) both are the same. The sums run over the whole batch axis
  (no per-device reduction), so under `jax.jit` with the batch sharded over devices and
  processes the group losses are those of the global batch.

  Args:
    losses: per-example losses `[b]`.
    groups: int group ids `[b]` in [0, G).
    mask: example weights `[b]` (0 for padding; 1 otherwise).
    q: current group weights `[G]` (non-negative, summing to 1).
    eta: the step size of the weight update (> 0).
    adjustment: `[G]` added to each group loss in the update (`group_dro_adjustment`),
      or None (0).

  Returns:
    (loss, q_new `[G]` (gradients stopped), group losses `[G]` (0 where absent),
    present `[G]` bool).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax.objectives import group_dro_loss
    >>> loss, q, _, present = group_dro_loss(jnp.array([1.0, 3.0, 2.0]), jnp.array([0, 0, 2]),
    ...                                      jnp.ones(3), jnp.full(3, 1 / 3), eta=0.0)
    >>> round(float(loss), 4), present.tolist()      # (2 + 2) / 3: group 1 is absent
    (1.3333, [True, False, True])
  """
  num_groups = q.shape[0]
  mask = mask.astype(jnp.float32)
  onehot = (groups[:, None] == jnp.arange(num_groups)[None, :]).astype(jnp.float32)
  onehot = onehot * mask[:, None]
  counts = jnp.sum(onehot, axis=0)
  sums = jnp.sum(onehot * losses.astype(jnp.float32)[:, None], axis=0)
  present = counts > 0
  group_losses = jnp.where(present, sums / jnp.where(present, counts, 1.0), 0.0)
  adjusted = group_losses if adjustment is None else group_losses + adjustment
  q_new = jax.lax.stop_gradient(
      group_dro_update(q.astype(jnp.float32), jax.lax.stop_gradient(adjusted), present, eta))
  loss = jnp.sum(jnp.where(present, q_new * group_losses, 0.0))
  return loss, q_new, group_losses, present
