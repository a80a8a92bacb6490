"""Group-wise evaluation metrics.

Examples belong to groups g = y * num_attrs + a, where y is the class and a the
spurious attribute. On device we accumulate per-group sums with `group_sums`;
on the host `GroupAccumulator` adds them up across batches and the
`group_*_metrics` functions turn the totals into named scalar metrics with keys
of the form "<split>/<metric>", e.g. "test/acc/group_1_0".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def group_name(g: int, num_attrs: int = 2) -> str:
  """Returns "group_{y}_{a}" for the group id g = y * num_attrs + a."""
  g = int(g)
  return f"group_{g // num_attrs}_{g % num_attrs}"


def group_sums(
    values: jnp.ndarray,
    groups: jnp.ndarray,
    mask: jnp.ndarray,
    num_groups: int,
) -> jnp.ndarray:
  """Per-group sums of `values * mask` (jittable; num_groups must be static).

  Args:
    values: [b] float values (e.g. 1.0 for a correct prediction).
    groups: [b] int group ids in [0, num_groups).
    mask: [b] float, 1 for a real example and 0 for padding.
    num_groups: number of groups G.

  Returns:
    [num_groups] float32 array of sums.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import group_sums
    >>> correct = jnp.array([1.0, 0.0, 1.0, 1.0])
    >>> group_sums(correct, groups=jnp.array([0, 0, 3, 1]), mask=jnp.array([1, 1, 1, 0]), num_groups=4)
    Array([1., 0., 0., 1.], dtype=float32)
  """
  values = jnp.asarray(values, jnp.float32) * jnp.asarray(mask, jnp.float32)
  return jax.ops.segment_sum(
      values, jnp.asarray(groups, jnp.int32), num_segments=num_groups)


def group_counts(logits: jnp.ndarray, batch: dict[str, jnp.ndarray],
                 num_groups: int) -> dict[str, jnp.ndarray]:
  """Per-group numbers of correct predictions and of examples in one batch (jittable).

  The sums an evaluation step returns per batch: add them up over batches with
  `GroupAccumulator` and turn the totals into metrics with `group_accuracy_metrics`
  (or let `evaluate_groups` do the whole loop).

  Args:
    logits: `[b, k]` predictions.
    batch: `label` and `group` int `[b]`, and `mask` float `[b]` (1 for a real example,
      0 for padding; all 1 when absent).
    num_groups: number of groups G (static under `jax.jit`).

  Returns:
    `{"correct": [G], "count": [G]}` float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import group_counts
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    >>> batch = {"label": jnp.array([0, 0, 1, 1]), "group": jnp.array([0, 1, 3, 3]),
    ...          "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}     # the last one is padding
    >>> {k: v.tolist() for k, v in group_counts(logits, batch, num_groups=4).items()}
    {'correct': [1.0, 0.0, 0.0, 1.0], 'count': [1.0, 1.0, 0.0, 1.0]}
  """
  labels = jnp.asarray(batch["label"])
  mask = batch["mask"] if "mask" in batch else jnp.ones(labels.shape, jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"correct": group_sums(correct, batch["group"], mask, num_groups),
          "count": group_sums(jnp.ones_like(correct), batch["group"], mask, num_groups)}


class GroupAccumulator:
  """Host-side accumulator of named per-group sums (float64, by addition).

  Add each batch's `group_sums` outputs (`[G]` arrays, numpy or jax) with `update`, then
  turn the `totals()` into metrics with `group_accuracy_metrics`.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import GroupAccumulator
    >>> acc = GroupAccumulator()
    >>> acc.update(correct=np.array([3, 1, 0, 2]), count=np.array([4, 2, 1, 2]))   # batch 1
    >>> acc.update(correct=np.array([1, 0, 1, 0]), count=np.array([1, 1, 1, 1]))   # batch 2
    >>> {name: total.tolist() for name, total in acc.totals().items()}
    {'correct': [4.0, 1.0, 1.0, 2.0], 'count': [5.0, 3.0, 2.0, 3.0]}
  """

  def __init__(self) -> None:
    self._sums: dict[str, np.ndarray] = {}

  def update(self, **named_sums: np.ndarray) -> None:
    """Adds each [G] array to the running total of the same name."""
    for name, value in named_sums.items():
      value = np.asarray(value, dtype=np.float64)
      if name in self._sums:
        if self._sums[name].shape != value.shape:
          raise ValueError(
              f"Shape mismatch for {name!r}: {self._sums[name].shape} vs "
              f"{value.shape}.")
        self._sums[name] = self._sums[name] + value
      else:
        self._sums[name] = value.copy()

  def totals(self) -> dict[str, np.ndarray]:
    """Returns a copy of the dict name -> accumulated [G] float64 array."""
    return {name: value.copy() for name, value in self._sums.items()}


_WARNED_ABSENT: set[tuple[str, str]] = set()  # (split, absent groups) already warned about


def group_accuracy_metrics(
    correct: np.ndarray,
    count: np.ndarray,
    train_counts: np.ndarray,
    *,
    split: str,
    num_attrs: int = 2,
) -> dict[str, float]:
  """Per-group, worst-group, average and train-adjusted average accuracy.

  Groups with count 0 in this split get no per-group key (never a 0 or 1) and are
  excluded from the worst-group and adjusted averages; a warning names them.

  Args:
    correct: [G] number of correct predictions per group.
    count: [G] number of examples per group in the evaluated split.
    train_counts: [G] number of training examples per group.
    split: prefix of the metric keys, e.g. "val" or "test".
    num_attrs: number of spurious attribute values.

  Returns:
    Dict with "{split}/acc/group_{y}_{a}", "{split}/worst_group_acc",
    "{split}/avg_acc" and "{split}/adj_avg_acc" (fractions in [0, 1]).

  Examples:
    >>> from dett_jax import group_accuracy_metrics
    >>> metrics = group_accuracy_metrics([3, 1, 2, 4], [4, 2, 2, 5], [70, 4, 1, 25], split="test")
    >>> {k: round(v, 3) for k, v in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'test/acc/group_0_0': 0.75, 'test/acc/group_0_1': 0.5, 'test/acc/group_1_0': 1.0,
     'test/acc/group_1_1': 0.8, 'test/worst_group_acc': 0.5, 'test/avg_acc': 0.769,
     'test/adj_avg_acc': 0.755}
  """
  correct = np.asarray(correct, dtype=np.float64)
  count = np.asarray(count, dtype=np.float64)
  train_counts = np.asarray(train_counts, dtype=np.float64)
  if not correct.shape == count.shape == train_counts.shape:
    raise ValueError(
        f"Shape mismatch: correct {correct.shape}, count {count.shape}, "
        f"train_counts {train_counts.shape}.")
  present = count > 0
  if not np.any(present):
    raise ValueError(f"No group occurs in split {split!r}.")
  absent = ", ".join(group_name(g, num_attrs) for g in np.flatnonzero(~present))
  if absent and (split, absent) not in _WARNED_ABSENT:  # once per split, not every epoch
    _WARNED_ABSENT.add((split, absent))
    logging.warning(
        "The %s split has no examples of %s: their accuracy is absent from the results "
        "(not 0 or 1), and %s/worst_group_acc and adj_avg_acc are over the %d groups "
        "present only; add examples of every group to the split to evaluate all of them.",
        split, absent, split, int(present.sum()))
  acc = np.where(present, correct / np.where(present, count, 1.0), 0.0)
  metrics: dict[str, float] = {}
  for g in np.flatnonzero(present):
    metrics[f"{split}/acc/{group_name(g, num_attrs)}"] = float(acc[g])
  metrics[f"{split}/worst_group_acc"] = float(np.min(acc[present]))
  metrics[f"{split}/avg_acc"] = float(correct.sum() / count.sum())
  weights = np.where(present, train_counts, 0.0)
  if weights.sum() > 0:
    adj = float((weights * acc).sum() / weights.sum())
  else:  # No training examples in any present group: fall back to plain avg.
    adj = metrics[f"{split}/avg_acc"]
  metrics[f"{split}/adj_avg_acc"] = adj
  return metrics


def group_ratio_metrics(
    numerator: np.ndarray,
    denominator: np.ndarray,
    *,
    split: str,
    name: str,
    num_attrs: int = 2,
) -> dict[str, float]:
  """Per-group and overall ratios sum(numerator) / sum(denominator).

  Used e.g. for agreement with the teacher (numerator = agreements,
  denominator = counts) and relative feature error.

  Args:
    numerator: [G] per-group numerator sums.
    denominator: [G] per-group denominator sums.
    split: key prefix, e.g. "test".
    name: metric name, e.g. "agreement".
    num_attrs: number of spurious attribute values.

  Returns:
    Dict with "{split}/{name}/group_{y}_{a}" for groups with denominator > 0
    and "{split}/{name}" overall (omitted if the total denominator is 0).
  """
  num = np.asarray(numerator, dtype=np.float64)
  den = np.asarray(denominator, dtype=np.float64)
  if num.shape != den.shape:
    raise ValueError(f"Shape mismatch: {num.shape} vs {den.shape}.")
  metrics: dict[str, float] = {}
  for g in np.flatnonzero(den > 0):
    metrics[f"{split}/{name}/{group_name(g, num_attrs)}"] = float(
        num[g] / den[g])
  if den.sum() > 0:
    metrics[f"{split}/{name}"] = float(num.sum() / den.sum())
  return metrics
