"""study.png of `dett_jax.study.write_study`: worst-group accuracy against each swept axis."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dett_jax.io import replace_atomic

# (axis name, value labels, one metric summary dict per value) of one subplot.
Panel = tuple[str, Sequence[str], Sequence[Mapping[str, Any]]]


def _series(summaries: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
  mean = [np.nan if s["mean"] is None else 100.0 * s["mean"]
          for s in summaries]
  std = [np.nan if s["std"] is None else 100.0 * s["std"] for s in summaries]
  return np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)


def plot_panels(panels: Sequence[Panel], path: str) -> None:
  """One subplot per panel: mean ± std val and test worst-group accuracy, written to `path`
  (a PNG, replaced atomically)."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top

  fig, subplots = plt.subplots(
      1, len(panels), squeeze=False,
      figsize=(sum(max(3.0, 0.9 * len(p[1]) + 1.5) for p in panels), 3.8))
  try:
    for ax, (axis, labels, metrics) in zip(subplots[0], panels):
      x = np.arange(len(labels), dtype=np.float64)
      for offset, split, marker in ((-0.08, "val", "o"), (0.08, "test", "s")):
        mean, std = _series([m[f"{split}/worst_group_acc"] for m in metrics])
        ax.errorbar(x + offset, mean, yerr=std, fmt=marker, capsize=4,
                    label=split)
      ax.set_xticks(x)
      ax.set_xticklabels(labels)
      ax.set_xlim(-0.5, len(labels) - 0.5)
      ax.set_xlabel(axis)
      ax.set_ylabel("worst-group accuracy (%)")
      ax.set_title(axis)
      ax.legend(fontsize="small")
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)
