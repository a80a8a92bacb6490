"""Deep Feature Reweighting (DFR): last-layer retraining on held-out data.

Kirichenko, Izmailov & Wilson (2022), "Last Layer Re-Training is Sufficient for
Robustness to Spurious Correlations". Given frozen embeddings of a held-out
(validation) set with group labels, DFR fits an L1-regularised logistic
regression on group-balanced subsamples and uses it as the new classifier head.

Procedure of `fit_dfr`:
  1. Split the held-out set (seeded, stratified by group) into halves A and B.
  2. For each C of the grid: standardize with the mean/std of A's
     group-balanced subsample, fit on that subsample, score the worst-group
     accuracy on B. The best C wins; ties go to the larger C. A best C at the grid's
     edge (strictly better than its neighbour) extends the grid beyond it (1 -> 3 -> 10; a bounded number of values, with a
     warning) and re-tunes on the same halves.
  3. With the chosen C, refit `num_refits` times on different group-balanced
     subsamples of the whole held-out set (standardized with the whole set's
     statistics) and average weights and intercepts.
  4. Fold the standardization into an ordinary Dense layer acting on raw
     embeddings: logits = x @ kernel + bias.

The logistic regression (`dett_jax.dfr_solver.fit_logistic_l1`) has the scikit-learn
meaning of C: it minimises ||W||_1 + C * sum_i logloss_i (intercept not penalised).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from dett_jax.dfr_solver import fit_logistic_l1

DEFAULT_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
_STD_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class DFRResult:
  """Result of `fit_dfr`.

  Attributes:
    kernel: [d, num_classes] float32 Dense kernel acting on raw embeddings.
    bias: [num_classes] float32 Dense bias.
    best_c: the chosen inverse regularisation strength C.
    c_scores: C -> worst-group accuracy on half B (the tuning scores).
    num_balanced: per-group subsample size used in the final refits.
  """

  kernel: np.ndarray
  bias: np.ndarray
  best_c: float
  c_scores: dict[float, float]
  num_balanced: int


# ----------------------------------------------------------------------------
# Input checks and data helpers.
# ----------------------------------------------------------------------------


def _check_inputs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
) -> None:
  """Raises ValueError for inputs DFR cannot work with."""
  if embeddings.ndim != 2:
    raise ValueError(
        f"embeddings must be 2-D [n, d], got shape {embeddings.shape}; "
        "reshape the features to [num_examples, feature_dim].")
  n = embeddings.shape[0]
  if labels.shape != (n,) or groups.shape != (n,):
    raise ValueError(
        "embeddings, labels and groups must have matching lengths, got "
        f"embeddings {embeddings.shape}, labels {labels.shape}, groups "
        f"{groups.shape}; pass one label and one group id per embedding row.")
  if num_classes < 2:
    raise ValueError(
        f"num_classes must be >= 2, got {num_classes}; DFR trains a "
        "classifier and needs at least two classes.")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"labels must lie in [0, {num_classes}), got range "
        f"[{labels.min()}, {labels.max()}]; fix the labels or num_classes.")
  present = np.unique(labels)
  if present.size < 2:
    raise ValueError(
        f"Fewer than 2 classes present in the held-out set (found "
        f"{present.tolist()}); DFR needs examples of every class.")
  missing = sorted(set(range(num_classes)) - set(present.tolist()))
  if missing:
    raise ValueError(
        f"Classes {missing} have no example in the held-out set; add examples "
        "of every class or lower num_classes.")
  _, counts = np.unique(groups, return_counts=True)
  if counts.min() < 2:
    raise ValueError(
        f"The smallest group present has {counts.min()} example(s); every "
        "group needs at least 2 so both held-out halves contain it. Add "
        "examples or merge/drop the tiny group.")


def _stratified_halves(
    groups: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Random split into halves A, B; every group (>= 2 examples) is in both."""
  half_a, half_b = [], []
  for g in np.unique(groups):
    idx = rng.permutation(np.flatnonzero(groups == g))
    cut = (idx.size + 1) // 2
    half_a.append(idx[:cut])
    half_b.append(idx[cut:])
  return np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))


def balanced_subsample(
    groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
  """Indices subsampling every present group to the smallest group's size.

  Args:
    groups: [n] int group ids.
    rng: numpy Generator (consumed).

  Returns:
    [num_groups_present * min_count] sorted int indices into `groups`.
  """
  uniq, counts = np.unique(groups, return_counts=True)
  m = int(counts.min())
  picks = [rng.choice(np.flatnonzero(groups == g), m, replace=False)
           for g in uniq]
  return np.sort(np.concatenate(picks))


def standardization_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean [d] and std [d] (std floored at 1e-6) of x [n, d]."""
  x = np.asarray(x, np.float64)
  return x.mean(0), np.maximum(x.std(0), _STD_FLOOR)


def _standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return ((x - mean) / std).astype(np.float32)


def worst_group_accuracy(
    pred: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> float:
  """Min over the groups present of the per-group accuracy (all [n] arrays)."""
  correct = np.asarray(pred) == np.asarray(labels)
  return float(min(correct[groups == g].mean() for g in np.unique(groups)))


def _predict_standardized(
    x: np.ndarray, w: np.ndarray, b: np.ndarray
) -> np.ndarray:
  """Class predictions [n] for standardized x; w [d, 1] is binary."""
  z = x @ w + b
  if w.shape[1] == 1:
    return (z[:, 0] > 0).astype(np.int64)  # argmax of [0, z]; ties -> 0
  return np.argmax(z, axis=1)


# ----------------------------------------------------------------------------
# Folding into a Dense layer.
# ----------------------------------------------------------------------------


def fold_standardization(
    w: np.ndarray,
    b: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Folds standardize-then-linear into one Dense layer on raw inputs.

  Args:
    w: [d, 1] (binary) or [d, k] weights on standardized inputs.
    b: [1] or [k] intercepts.
    mean: [d] feature means; std: [d] feature stds.
    num_classes: k.

  Returns:
    (kernel [d, k], bias [k]) float32 with x @ kernel + bias equal to the
    standardized model's logits; for binary the logits are [0, z], whose
    softmax is [1 - sigmoid(z), sigmoid(z)].
  """
  w = np.asarray(w, np.float64)
  b = np.asarray(b, np.float64)
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  scaled = w / std[:, None]
  offset = b - (mean / std) @ w
  if num_classes == 2:
    kernel = np.concatenate([np.zeros_like(scaled), scaled], axis=1)
    bias = np.array([0.0, offset[0]])
  else:
    kernel, bias = scaled, offset
  return kernel.astype(np.float32), bias.astype(np.float32)


def dense_params(result: DFRResult) -> dict:
  """The Flax `nn.Dense` parameter subtree `{"kernel": [d, k], "bias": [k]}` of a DFR result.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import dense_params, fit_dfr
    >>> groups = np.repeat(np.arange(4), 10)
    >>> embeddings = np.random.default_rng(0).normal(size=(40, 8)) + (groups // 2)[:, None]
    >>> head = dense_params(fit_dfr(embeddings, groups // 2, groups, num_classes=2,
    ...                             c_grid=(1.0,), num_refits=2))
    >>> head["kernel"].shape, head["bias"].shape
    ((8, 2), (2,))
  """
  return {"kernel": jnp.asarray(result.kernel), "bias": jnp.asarray(result.bias)}


# ----------------------------------------------------------------------------
# DFR.
# ----------------------------------------------------------------------------


def _tune_c(
    x: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    c_grid: Sequence[float],
    rng: np.random.Generator,
    max_extensions: int = 0,
) -> dict[float, float]:
  """Worst-group accuracy on half B for each C (fit on balanced half A).

  When the best C is the grid's largest or smallest value and scores strictly better
  than its neighbour in the grid (a tie is a plateau, not a trend), the grid is extended
  beyond that edge, one value at a time (`_beyond`), and the new values scored on the
  same halves, at most `max_extensions` values in all; every score is kept. The rng is consumed only by the split, so the extension changes nothing
  downstream but the chosen C."""
  idx_a, idx_b = _stratified_halves(groups, rng)
  train = idx_a[balanced_subsample(groups[idx_a], rng)]
  mean, std = standardization_stats(x[train])
  x_train = _standardize(x[train], mean, std)
  x_eval = _standardize(x[idx_b], mean, std)

  def score(c: float) -> float:
    w, b = fit_logistic_l1(x_train, labels[train], c=c, num_classes=num_classes)
    pred = _predict_standardized(x_eval, w, b)
    return worst_group_accuracy(pred, labels[idx_b], groups[idx_b])

  scores = {float(c): score(float(c)) for c in c_grid}
  for _ in range(max_extensions if len(scores) > 1 else 0):
    best, grid = _pick_c(scores), sorted(scores)
    if best == grid[-1] and scores[best] > scores[grid[-2]]:
      edge, new = "largest", _beyond(best, up=True)
    elif best == grid[0] and scores[best] > scores[grid[1]]:
      edge, new = "smallest", _beyond(best, up=False)
    else:
      break
    logging.warning(
        "DFR: the best C=%g (worst-group accuracy %.4f on the tuning half) is the grid's "
        "%s value; extending the C grid %s to %g and re-tuning", best, scores[best], edge,
        "upward" if edge == "largest" else "downward", new)
    scores[new] = score(new)
  return scores


def _beyond(c: float, up: bool) -> float:
  """The next value of the 1-3-10 grid beyond `c`: factors of 3 and 10/3 in turn
  (1 -> 3 -> 10 upward; 0.01 -> 0.003 -> 0.001 downward), 3 significant digits."""
  mantissa = c / 10.0 ** np.floor(np.log10(c))  # in [1, 10)
  if up:
    factor = 3.0 if mantissa < 2.0 else 10.0 / 3.0
  else:
    factor = 1.0 / 3.0 if mantissa > 2.0 else 0.3
  return float(f"{c * factor:.3g}")


def _pick_c(scores: dict[float, float]) -> float:
  """Best worst-group accuracy; ties -> the larger C (weaker L1)."""
  return max(scores, key=lambda c: (scores[c], c))


def fit_dfr(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    num_classes: int,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    num_refits: int = 10,
    seed: int = 0,
    max_grid_extensions: int = 3,
) -> DFRResult:
  """Deep Feature Reweighting on held-out embeddings.

  Args:
    embeddings: [n, d] float held-out (validation) embeddings.
    labels: [n] int class labels in [0, num_classes).
    groups: [n] int group ids (opaque, e.g. label * num_attrs + attr).
    num_classes: number of classes k >= 2.
    c_grid: inverse L1 strengths to tune over.
    num_refits: number of balanced refits averaged for the final head.
    seed: seed of the split and the subsampling.
    max_grid_extensions: when the best C is the grid's largest (smallest) value and
      strictly better than its neighbour, the grid is extended beyond it (factors of 3 and 10/3: 1 -> 3 -> 10) and re-tuned on
      the same halves, with a warning, up to this many new values (0: never; a
      one-value grid is never extended). `c_scores` keeps every score. With the best C
      inside the grid, nothing changes.

  Returns:
    DFRResult with a Dense kernel [d, k] / bias [k] on raw embeddings.

  Raises:
    ValueError: mismatched lengths, fewer than 2 classes, a class without
      examples, or a group with fewer than 2 examples.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import fit_dfr
    >>> groups = np.repeat(np.arange(4), 10)                  # g = 2 * y + a
    >>> labels = groups // 2
    >>> embeddings = np.random.default_rng(0).normal(size=(40, 8)) + labels[:, None]
    >>> result = fit_dfr(embeddings, labels, groups, num_classes=2, c_grid=(1.0, 0.1), num_refits=2)
    >>> result.kernel.shape, result.bias.shape, result.best_c in result.c_scores
    ((8, 2), (2,), True)
  """
  x = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels).astype(np.int64)
  groups = np.asarray(groups).astype(np.int64)
  _check_inputs(x, labels, groups, num_classes)
  if not c_grid:
    raise ValueError("c_grid is empty; pass at least one C > 0.")
  if num_refits < 1:
    raise ValueError(f"num_refits must be >= 1, got {num_refits}.")
  rng = np.random.default_rng(seed)

  scores = _tune_c(x, labels, groups, num_classes, c_grid, rng, max_grid_extensions)
  best_c = _pick_c(scores)

  mean, std = standardization_stats(x)
  x_std = _standardize(x, mean, std)
  ws, bs = [], []
  for _ in range(num_refits):
    sub = balanced_subsample(groups, rng)
    w, b = fit_logistic_l1(
        x_std[sub], labels[sub], c=best_c, num_classes=num_classes)
    ws.append(w)
    bs.append(b)
  kernel, bias = fold_standardization(
      np.mean(ws, 0), np.mean(bs, 0), mean, std, num_classes)
  num_balanced = int(np.unique(groups, return_counts=True)[1].min())
  return DFRResult(kernel=kernel, bias=bias, best_c=float(best_c),
                   c_scores=scores, num_balanced=num_balanced)
