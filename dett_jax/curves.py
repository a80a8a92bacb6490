"""Training curves (`curves.png`, `study_curves.png`) from a workdir's `metrics.jsonl`.

`training.loop.MetricLogger` appends one record per log step,
`{"stage", "step", "loss", ...}` (the mean over the steps since the previous record; a
sweep group's records also hold each stacked variant's `loss/variant_<i>` and the
`epoch`), and at each epoch's end of a stage that evaluates, `{"stage", "step",
"val/worst_group_acc", ...}`. A log window never spans two epochs (the loop logs at every
epoch's end), so a record at step s of a stage with E steps per epoch belongs to epoch
ceil(s / E); E comes from the record's `epoch`, the stage's `done.json` history
(`{"epoch", "step"}` per epoch), or its validation records (written at epoch ends), and
when none is known the panel's x axis is the step.

`write_curves(workdir, filename)` plots one panel per stage, in the order the stages
first logged: the training loss per epoch (mean of the epoch's logged losses; one line
per variant for a sweep group, named by its `done.json` runs) and, where recorded, the
validation worst-group accuracy per epoch on a second axis. A missing or unreadable log,
or one without losses, writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from dett_jax.io import replace_atomic

VAL_METRIC = "val/worst_group_acc"
_VARIANT_RE = re.compile(r"^loss/variant_(\d+)$")
_MAX_LEGEND = 10  # more variant lines than this: no legend entry per line


@dataclasses.dataclass
class StageCurves:
  """One panel: loss lines (label -> (x, y)) and the validation worst-group accuracy."""

  name: str
  xlabel: str  # "epoch" or "step"
  losses: dict[str, tuple[np.ndarray, np.ndarray]]
  val: tuple[np.ndarray, np.ndarray] | None = None


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(float(value)) else None


def read_metrics(path: str) -> dict[str, dict[int, dict[str, Any]]]:
  """stage -> step -> the merged records of that step (later ones win: a resumed stage
  logs its steps again), stages in the order they first appear. Lines that are not a
  record (a truncated last line, say) are skipped; a missing file gives {}."""
  stages: dict[str, dict[int, dict[str, Any]]] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError):
    return {}
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if not isinstance(record, dict) or not isinstance(record.get("stage"), str):
      continue
    step = _number(record.get("step"))
    if step is None:
      continue
    stages.setdefault(record["stage"], {}).setdefault(int(step), {}).update(record)
  return stages


def _done(workdir: str, stage: str) -> dict[str, Any]:
  """The stage's done.json, or {} (absent, unreadable, or a name that is no directory)."""
  if not stage or stage in (".", "..") or "/" in stage or os.sep in stage:
    return {}
  try:
    with open(os.path.join(workdir, stage, "done.json"), encoding="utf-8") as f:
      done = json.load(f)
  except (OSError, ValueError):
    return {}
  return done if isinstance(done, dict) else {}


def _steps_per_epoch(steps: dict[int, dict[str, Any]], done: dict[str, Any]) -> int | None:
  """E from the stage's done.json history, else its first validation record's step, else
  (identification) its last logged step over the done.json's `settings.T_id` epochs."""
  history = done.get("history")
  for h in history if isinstance(history, list) else []:
    if not isinstance(h, dict):
      continue
    epoch, step = _number(h.get("epoch")), _number(h.get("step"))
    if epoch and step and step % epoch == 0:
      return int(step // epoch)
  val_steps = [s for s, r in steps.items() if _number(r.get(VAL_METRIC)) is not None and s > 0]
  if val_steps:
    return min(val_steps)
  settings = done.get("settings")  # an identification stage: T_id epochs, all logged
  epochs = _number(settings.get("T_id")) if isinstance(settings, dict) else None
  last = max(steps, default=0)
  return int(last // epochs) if epochs and last > 0 and last % epochs == 0 else None


def _epochs(steps: dict[int, dict[str, Any]], done: dict[str, Any]) -> tuple[dict[int, int], str]:
  """(step -> x value, the x label): the epoch of each record, or its step."""
  per_epoch = _steps_per_epoch(steps, done)
  x, known = {}, True
  for step, record in steps.items():
    epoch = _number(record.get("epoch"))
    if epoch is not None:
      x[step] = int(epoch)
    elif per_epoch:
      x[step] = -(-step // per_epoch)
    else:
      known = False
  return (x, "epoch") if known else ({s: s for s in steps}, "step")


def _per_x(steps: dict[int, dict[str, Any]], x: dict[int, int], key: str
           ) -> tuple[np.ndarray, np.ndarray] | None:
  """(x values, the mean of `key`'s finite logged values at each), or None if none."""
  values: dict[int, list[float]] = {}
  for step, record in sorted(steps.items()):
    value = _number(record.get(key))
    if value is not None:
      values.setdefault(x[step], []).append(value)
  if not values:
    return None
  xs = sorted(values)
  return np.asarray(xs, np.float64), np.asarray([np.mean(values[v]) for v in xs], np.float64)


def _variant_labels(done: dict[str, Any], count: int) -> list[str]:
  runs = done.get("runs")
  names = [r.get("name") for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
  return [str(names[i]) if i < len(names) and names[i] is not None else f"variant {i}"
          for i in range(count)]


def stage_curves(workdir: str, stages: dict[str, dict[int, dict[str, Any]]]
                 ) -> list[StageCurves]:
  """The panels of the stages that logged a loss (see the module docstring)."""
  panels = []
  for name, steps in stages.items():
    done = _done(workdir, name)
    x, xlabel = _epochs(steps, done)
    variants = sorted({int(m.group(1)) for r in steps.values() for k in r
                       for m in [_VARIANT_RE.match(k)] if m})
    losses = {}
    if variants:
      labels = _variant_labels(done, max(variants) + 1)
      for i in variants:
        curve = _per_x(steps, x, f"loss/variant_{i}")
        if curve is not None:
          losses[labels[i]] = curve
    if not losses:
      curve = _per_x(steps, x, "loss")
      if curve is not None:
        losses["loss"] = curve
    if losses:
      panels.append(StageCurves(name, xlabel, losses, _per_x(steps, x, VAL_METRIC)))
  return panels


def _draw(ax, panel: StageCurves) -> None:
  """One stage: its loss line(s) on `ax`, the validation accuracy on a twin axis."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  handles = []
  many = len(panel.losses) > 1
  for i, (label, (xs, ys)) in enumerate(panel.losses.items()):
    color = f"C{i % 10}" if many else "tab:blue"
    (line,) = ax.plot(xs, ys, marker="o", markersize=3, color=color,
                      label=label if many else "training loss")
    handles.append(line)
  ax.set_xlabel(panel.xlabel)
  ax.set_ylabel("training loss")
  ax.set_title(panel.name, fontsize="small")
  if panel.xlabel == "epoch":
    last = max(float(xs.max()) for xs, _ in panel.losses.values())
    ax.set_xlim(0.5, last + 0.5)
    if last <= 12:
      ax.set_xticks(np.arange(1, int(last) + 1))
    else:
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if panel.val is not None:
    twin = ax.twinx()
    (line,) = twin.plot(panel.val[0], 100.0 * panel.val[1], marker="s", markersize=3,
                        color="tab:orange", linestyle="--", label="val worst group")
    twin.set_ylim(-3.0, 103.0)
    twin.set_ylabel("val worst-group accuracy (%)")
    handles.append(line)
  if len(handles) <= _MAX_LEGEND:
    ax.legend(handles=handles, fontsize="x-small", loc="best")
  else:
    ax.text(0.98, 0.98, f"{len(panel.losses)} variants", transform=ax.transAxes,
            ha="right", va="top", fontsize="x-small")


def plot_curves(panels: Sequence[StageCurves], path: str, columns: int = 4) -> None:
  """One subplot per panel (up to `columns` a row), written to `path` (PNG, atomically)."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top
  cols = max(1, min(columns, len(panels)))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.6 * cols, 3.4 * rows))
  try:
    for ax, panel in zip(axes.flat, panels):
      _draw(ax, panel)
    for ax in list(axes.flat)[len(panels):]:
      ax.set_visible(False)
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)


def write_curves(workdir: str, filename: str = "curves.png") -> bool:
  """Writes `<workdir>/<filename>` from `<workdir>/metrics.jsonl`; returns whether it did
  (False: no log, or no stage logged a loss)."""
  panels = stage_curves(workdir, read_metrics(os.path.join(workdir, "metrics.jsonl")))
  if not panels:
    return False
  plot_curves(panels, os.path.join(workdir, filename))
  return True
