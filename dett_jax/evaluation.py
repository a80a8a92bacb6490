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
from dett_jax.metrics import GroupAccumulator, group_accuracy_metrics, group_ratio_metrics
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
  """Metrics named as DESIGN.md section 5, plus agreement and feature error when present."""
  metrics = group_accuracy_metrics(sums["correct"], sums["count"], train_counts, split=split,
                                   num_attrs=num_attrs)
  if "agree" in sums:
    metrics.update(group_ratio_metrics(sums["agree"], sums["count"], split=split,
                                       name="agreement", num_attrs=num_attrs))
  if "feat_sq_err" in sums:
    metrics.update(group_ratio_metrics(sums["feat_sq_err"], teacher_spread(sums), split=split,
                                       name="feature_error", num_attrs=num_attrs))
  return metrics


def teacher_spread(sums: dict[str, np.ndarray]) -> np.ndarray:
  """Per group sum_i ||f_T(x_i) - mean f_T||^2, the mean taken over the whole split. `[G]`."""
  count, teacher_sum = sums["count"], sums["teacher_sum"]
  mean = teacher_sum.sum(0) / max(count.sum(), 1.0)
  return sums["teacher_sq"] - 2 * teacher_sum @ mean + count * float(mean @ mean)
