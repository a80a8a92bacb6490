"""Evaluation over a whole split: group accuracies and student diagnostics."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from dett_jax.data.images import Preprocess
from dett_jax.data.pipeline import eval_batches
from dett_jax.data.split import Split
from dett_jax.distributed import to_host
from dett_jax.methods.base import model_inputs
from dett_jax.metrics import (GroupAccumulator, group_accuracy_metrics, group_counts,
                              group_ratio_metrics)
from dett_jax.sharding import shard_batch


def accumulate(eval_step: Callable, variables: Any, frozen: Any, split: Split, mesh: Mesh,
               batch_size: int, preprocess: Preprocess | None = None,
               workers: int = 0, host_view: Callable | None = None) -> dict[str, np.ndarray]:
  """Runs a jitted `eval_step` over every example of `split`; returns summed outputs.

  Each process loads only its slice of every batch; the step's sums are global (reduced
  over the whole batch inside the jitted program), so every process returns the same
  totals. A collective with several processes: all of them must call it. `host_view`
  turns what the step returns, on the host, into the sums dict (None: it is that dict).
  """
  acc = GroupAccumulator()
  pending = []
  for batch in eval_batches(split, global_batch_size=batch_size, preprocess=preprocess,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), workers=workers):
    pending.append(eval_step(variables, shard_batch(batch, mesh), frozen))
  for sums in to_host(pending):  # replicated sums: read locally, no gather
    acc.update(**(host_view(sums) if host_view else sums))
  return acc.totals()


def split_metrics(sums: dict[str, np.ndarray], train_counts: np.ndarray, split: str,
                  num_attrs: int) -> dict[str, float]:
  """Metrics named as in docs/design.md, "Metric names", plus agreement and feature error when present."""
  metrics = group_accuracy_metrics(sums["correct"], sums["count"], train_counts, split=split,
                                   num_attrs=num_attrs)
  if "agree" in sums:
    metrics.update(group_ratio_metrics(sums["agree"], sums["count"], split=split,
                                       name="agreement", num_attrs=num_attrs))
  if "feat_sq_err" in sums:
    metrics.update(group_ratio_metrics(sums["feat_sq_err"], teacher_spread(sums), split=split,
                                       name="feature_error", num_attrs=num_attrs))
  if "logit_sq_err" in sums:
    spread = teacher_spread(sums, "teacher_logit_sq", "teacher_logit_sum")
    metrics.update(group_ratio_metrics(sums["logit_sq_err"], spread, split=split,
                                       name="logit_error", num_attrs=num_attrs))
  return metrics


def teacher_spread(sums: dict[str, np.ndarray], sq: str = "teacher_sq",
                   total: str = "teacher_sum") -> np.ndarray:
  """Per group sum_i ||t_i - mean t||^2, the mean taken over the whole split, `[G]`: of the
  teacher's feature maps (default) or, with `sq="teacher_logit_sq"`,
  `total="teacher_logit_sum"`, of its logits (the denominator of `logit_error`)."""
  count, teacher_sum = sums["count"], sums[total]
  mean = teacher_sum.sum(0) / max(count.sum(), 1.0)
  return sums[sq] - 2 * teacher_sum @ mean + count * float(mean @ mean)


def head_sensitivity(sums: dict[str, np.ndarray], head: Any) -> dict[str, list[float]] | None:
  """Per feature direction (channel of the pooled features) of a feature-matching
  student, from a split's `feature_diagnostics` sums: `head_weight` (the norm of the
  head's row for it, class mean removed: how strongly the decision reads it),
  `teacher_std` (the teacher feature's spread over the split), `student_rmse` (the
  student's root-mean-square error on it) and `reading` = head_weight x teacher_std (how
  much of the teacher's logit variation comes from it). None without those sums."""
  if "channel_t_sum" not in sums:
    return None
  n = max(float(np.sum(sums["count"])), 1.0)
  mean = sums["channel_t_sum"].sum(0) / n
  std = np.sqrt(np.maximum(sums["channel_t_sq"].sum(0) / n - mean**2, 0.0))
  rmse = np.sqrt(sums["channel_err_sq"].sum(0) / n)
  kernel = np.asarray(head["kernel"], np.float64)
  weight = np.linalg.norm(kernel - kernel.mean(1, keepdims=True), axis=1)
  return {"head_weight": weight.tolist(), "teacher_std": std.tolist(),
          "student_rmse": rmse.tolist(), "reading": (weight * std).tolist()}


_group_counts = jax.jit(group_counts, static_argnums=2)


def split_outputs(fn: Callable[[Any], Any], split: Split, *, preprocess: Preprocess | None = None,
                  batch_size: int = 256) -> np.ndarray:
  """`fn(images)` for every example of `split`, in dataset order: `[n, ...]` (numpy).

  For per-example outputs of a whole split, e.g. an identification model's logits on the
  training set (for `find_error_set`) or a teacher's pooled features on the validation set
  (for `fit_dfr`). Images come from `eval_batches` (not augmented); `fn` sees batches of
  `batch_size` (the last one padded) and is best jitted.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import load_splits, split_outputs
    >>> train = load_splits({"name": "synthetic", "image_size": 16, "train_size": 40,
    ...                      "val_size": 8, "test_size": 8})["train"]
    >>> means = split_outputs(lambda images: jnp.mean(images, axis=(1, 2)), train, batch_size=16)
    >>> means.shape == (len(train), 3)
    True
  """
  outputs = [np.asarray(fn(model_inputs(batch)))
             for batch in eval_batches(split, global_batch_size=batch_size, preprocess=preprocess)]
  return np.concatenate(outputs)[:len(split)]


def evaluate_groups(logits_fn: Callable[[Any], Any], split: Split, train_counts: np.ndarray, *,
                    name: str, preprocess: Preprocess | None = None,
                    batch_size: int = 256) -> dict[str, float]:
  """Group accuracies of `logits_fn(images) -> [b, k]` on every example of `split`.

  The whole evaluation loop: `eval_batches`, `group_counts` per batch,
  `GroupAccumulator`, `group_accuracy_metrics`. `logits_fn` (best jitted) sees batches of
  `batch_size`, the last one padded (padding is not counted).

  Args:
    logits_fn: images `[b, h, w, 3]` -> logits `[b, k]`.
    split: the evaluated split.
    train_counts: training examples per group `[G]` (`train_split.group_counts()`), the
      weights of `adj_avg_acc`.
    name: the metric keys' prefix, e.g. "val" or "test".
    preprocess: the images' transform (default: the split's own size, for in-memory images).
    batch_size: examples per batch.

  Returns:
    `"{name}/acc/group_{y}_{a}"`, `"{name}/worst_group_acc"`, `"{name}/avg_acc"`,
    `"{name}/adj_avg_acc"` (fractions; see `group_accuracy_metrics`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dett_jax import evaluate_groups, load_splits
    >>> splits = load_splits({"name": "synthetic", "image_size": 16, "train_size": 40,
    ...                       "val_size": 8, "test_size": 40})
    >>> always_0 = jax.jit(lambda images: jnp.zeros((images.shape[0], 2)).at[:, 0].set(1.0))
    >>> metrics = evaluate_groups(always_0, splits["test"], splits["train"].group_counts(),
    ...                           name="test", batch_size=16)
    >>> metrics["test/worst_group_acc"], metrics["test/acc/group_0_0"]
    (0.0, 1.0)
  """
  accumulator = GroupAccumulator()
  num_groups = len(train_counts)
  for batch in eval_batches(split, global_batch_size=batch_size, preprocess=preprocess):
    accumulator.update(**jax.device_get(_group_counts(logits_fn(model_inputs(batch)), batch,
                                                      num_groups)))
  totals = accumulator.totals()
  return group_accuracy_metrics(totals["correct"], totals["count"], train_counts, split=name,
                                num_attrs=split.num_attrs)
