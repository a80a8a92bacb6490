"""Study report of an ablation sweep (student variants x seeds).

`write_study(runs, axes, workdir)` aggregates one results dict per trained run,

  {"name": "simkd_l5_s0", "variant": {"projector": "simkd", "lambda_up": 5},
   "seed": 0, "metrics": {"val/worst_group_acc": 0.81, "test/avg_acc": ..., ...}}

into study.json (per-variant and per-axis mean/std over seeds), study.md
(tables in percent) and study.png (worst-group accuracy against each axis), plus
study_curves.png (training curves, one line per sweep variant) from the workdir's
metrics.jsonl when there is one.
Metric keys follow `dett_jax.metrics.group_accuracy_metrics`. A missing (None
or NaN) metric is absent: it is left out of n, means and stds, never a 0. The
best variant is picked on validation worst-group accuracy only.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dett_jax.curves import write_curves
from dett_jax.io import write_json_atomic, write_text_atomic as _write_text_atomic
from dett_jax.report import MISSING, format_percent, format_table
from dett_jax.study_input import (builtin_value, canonical_variant, check_runs, clean_run,
                                  validate_axes, value_key)
from dett_jax.study_plots import plot_panels

SPLITS = ("val", "test")
KINDS = ("worst_group_acc", "avg_acc", "adj_avg_acc")
METRICS = tuple(f"{split}/{kind}" for split in SPLITS for kind in KINDS)
_LABELS = {"worst_group_acc": "worst group", "avg_acc": "average",
           "adj_avg_acc": "adjusted average"}

SELECTION = ("The best variant is the one with the highest mean validation "
             "worst-group accuracy over seeds (ties: higher mean validation "
             "average accuracy, then the first in sweep order); test metrics "
             "are never used to select.")

_TIE_TOL = 1e-12


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
  """The metric as a float, or None when absent (missing, None, NaN, inf)."""
  value = builtin_value(metrics.get(key))
  if value is None or isinstance(value, bool):
    return None
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
  """{"mean", "std" (ddof=0), "n"} over the present values; None if none."""
  present = np.asarray([v for v in values if v is not None], dtype=np.float64)
  if present.size == 0:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(present.mean()), "std": float(present.std()),
          "n": int(present.size)}


def _summaries(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  return {key: _summary([_metric(r.get("metrics") or {}, key) for r in runs])
          for key in METRICS}


def _label(variant: Mapping[str, Any]) -> str:
  if not variant:
    return "(all runs)"
  return ", ".join(f"{axis}={value}" for axis, value in variant.items())


def _sort_key(variant: Mapping[str, Any],
              axes: Mapping[str, list[Any]]) -> tuple[int, ...]:
  """Sweep order: by each axis's value index; a missing axis sorts last."""
  key = []
  for axis, values in axes.items():
    if axis in variant:
      key.append(next(i for i, v in enumerate(values)
                      if value_key(v, axis) == value_key(variant[axis], axis)))
    else:
      key.append(len(values))
  return tuple(key)


def _pick_best(variants: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
  """Highest mean val worst-group acc; ties: higher mean val avg acc, then first."""
  def score(v: Mapping[str, Any], key: str) -> float:
    mean = v["metrics"][key]["mean"]
    return -math.inf if mean is None else mean

  candidates = [v for v in variants
                if v["metrics"]["val/worst_group_acc"]["mean"] is not None]
  for key in ("val/worst_group_acc", "val/avg_acc"):
    if not candidates:
      return None
    top = max(score(v, key) for v in candidates)
    candidates = [v for v in candidates if score(v, key) >= top - _TIE_TOL]
  return dict(candidates[0]) if candidates else None


def _group_runs(runs: Sequence[Mapping[str, Any]], axes: Mapping[str, list[Any]]
                ) -> tuple[list[dict[str, Any]], dict[tuple, list[dict[str, Any]]]]:
  """(the clean runs in input order, variant key -> its clean runs); refuses a (variant,
  seed) pair that occurs twice."""
  clean_runs = []
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for i, run in enumerate(runs):
    variant = canonical_variant(run, i, axes)
    where = f"runs[{i}] ({run.get('name', 'unnamed')!r})"
    clean = clean_run(run, variant, where)
    key = tuple((axis, value_key(value, where))
                for axis, value in variant.items())
    for other in groups.get(key, []):
      if other["seed"] == clean["seed"]:
        raise ValueError(
            f"{where}: variant {_label(variant)} with seed {clean['seed']} occurs "
            f"twice (also as {other.get('name', 'unnamed')!r}); each "
            "(variant, seed) pair must be one run.")
    groups.setdefault(key, []).append(clean)
    clean_runs.append(clean)
  return clean_runs, groups


def _variant_rows(groups: Mapping[tuple, list[dict[str, Any]]],
                  axes: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
  """One summary per variant, in sweep order."""
  variants = []
  for members in groups.values():
    variant = members[0]["variant"]
    variants.append({
        "variant": variant,
        "label": _label(variant),
        "seeds": sorted(r["seed"] for r in members),
        "runs": [r.get("name") for r in members],
        "metrics": _summaries(members),
    })
  variants.sort(key=lambda v: _sort_key(v["variant"], axes))
  return variants


def _per_axis(clean_runs: Sequence[Mapping[str, Any]],
              axes: Mapping[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
  """axis -> one row per value: the runs with that value, marginal over the rest."""
  per_axis: dict[str, list[dict[str, Any]]] = {}
  for axis, values in axes.items():
    rows = []
    for value in values:
      vkey = value_key(value, axis)
      members = [r for r in clean_runs if axis in r["variant"]
                 and value_key(r["variant"][axis], axis) == vkey]
      rows.append({"value": value, "n_runs": len(members),
                   "metrics": _summaries(members)})
    per_axis[axis] = rows
  return per_axis


def build_study(runs: Sequence[Mapping[str, Any]],
                axes: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
  """The study dict of `write_study` (validates input; writes nothing)."""
  axes = validate_axes(axes)
  check_runs(runs)
  clean_runs, groups = _group_runs(runs, axes)
  variants = _variant_rows(groups, axes)
  study = {"axes": axes, "runs": clean_runs, "per_axis": _per_axis(clean_runs, axes),
           "variants": variants, "best": _pick_best(variants),
           "selection": SELECTION}
  if "method" in axes:  # equal tuning: each method's best of the same grid
    study["best_per_method"] = {
        str(m): _pick_best([v for v in variants if v["variant"].get("method") == m])
        for m in axes["method"]}
  return study


def _mean_std(summary: Mapping[str, Any], total: int | None = None) -> str:
  """"81.3 ± 2.1" in percent; "—" if absent; "(n=k)" if only k of total."""
  if summary["mean"] is None:
    return MISSING
  text = f"{format_percent(summary['mean'])} ± {format_percent(summary['std'])}"
  if total is not None and summary["n"] < total:
    text += f" (n={summary['n']})"
  return text


def _best_line(best: Mapping[str, Any] | None) -> str:
  if best is None:
    return ("**Best variant:** none (no run has "
            "val/worst_group_acc).\n")
  m = best["metrics"]
  seeds = ", ".join(str(s) for s in best["seeds"])
  parts = [f"{split} {_LABELS[kind]} {_mean_std(m[f'{split}/{kind}'])}"
           for split in SPLITS for kind in KINDS]
  return (f"**Best variant:** {best['label']} (seeds {seeds}): "
          + "; ".join(parts) + ".\n")


def _axis_table(axis: str, rows: Sequence[Mapping[str, Any]]) -> str:
  metric_columns = [f"{split} {_LABELS[kind]}" for split in SPLITS
                    for kind in KINDS]
  columns = [axis, "n runs"] + metric_columns
  table_rows = []
  for row in rows:
    cells = {axis: str(row["value"]), "n runs": row["n_runs"]}
    for key, column in zip(METRICS, metric_columns):
      cells[column] = _mean_std(row["metrics"][key], row["n_runs"])
    table_rows.append(cells)
  return format_table(table_rows, columns)


def _variants_table(variants: Sequence[Mapping[str, Any]],
                    axes: Mapping[str, Any]) -> str:
  columns = list(axes) + ["val worst group", "test worst group", "seeds"]
  rows = []
  for v in variants:
    total = len(v["seeds"])
    cells = {axis: str(v["variant"][axis]) if axis in v["variant"] else MISSING
             for axis in axes}
    cells["val worst group"] = _mean_std(v["metrics"]["val/worst_group_acc"],
                                         total)
    cells["test worst group"] = _mean_std(v["metrics"]["test/worst_group_acc"],
                                          total)
    cells["seeds"] = ", ".join(str(s) for s in v["seeds"])
    rows.append(cells)
  return format_table(rows, columns)


def _per_method_table(best: Mapping[str, Any]) -> str:
  rows = []
  for method, chosen in best.items():
    if chosen is None:
      rows.append({"method": method, "chosen": MISSING})
      continue
    m = chosen["metrics"]
    rows.append({"method": method,
                 "chosen": ", ".join(f"{k}={v}" for k, v in chosen["variant"].items()
                                     if k != "method"),
                 "val worst group": _mean_std(m["val/worst_group_acc"]),
                 "test worst group": _mean_std(m["test/worst_group_acc"]),
                 "test average": _mean_std(m["test/avg_acc"]),
                 "seeds": ", ".join(str(x) for x in chosen["seeds"])})
  return format_table(rows, ["method", "chosen", "val worst group", "test worst group",
                             "test average", "seeds"])


def _markdown(study: Mapping[str, Any], curves: bool = False) -> str:
  """study.md; `curves`: study_curves.png was written (shown inline after study.png)."""
  parts = [
      "# Ablation study\n",
      f"{len(study['runs'])} runs, {len(study['variants'])} variants. "
      "Accuracies in percent as mean ± std (population std, ddof=0) over "
      f"seeds or runs; {MISSING} marks an absent metric, which is left out "
      "of means and counts (n=k: only k runs have it).\n",
      study["selection"] + "\n",
      _best_line(study["best"]),
  ]
  if study.get("best_per_method"):
    parts += ["## Best per method\n",
              "Each method's best variant of the same grid (the other axes), chosen as above "
              "on validation worst-group accuracy only; its test accuracy is reported, "
              "never used.\n", _per_method_table(study["best_per_method"])]
  for axis, rows in study["per_axis"].items():
    parts += [f"## {axis}\n",
              "Marginal over the other axes and seeds.\n",
              _axis_table(axis, rows)]
  parts += ["## All variants\n", _variants_table(study["variants"],
                                                 study["axes"])]
  parts += ["## Figures\n", "Worst-group accuracy per axis ([study.png](study.png)):\n",
            "![worst-group accuracy per axis](study.png)\n"]
  if curves:
    parts += ["Training curves ([study_curves.png](study_curves.png)): per stage, the "
              "training loss per epoch, one line per variant of each sweep group, and, where "
              "the stage evaluates, the validation worst-group accuracy per epoch (dashed, "
              "right axis).\n", "![training curves](study_curves.png)\n"]
  return "\n".join(parts)


def _plot(study: Mapping[str, Any], path: str) -> None:
  """study.png: one subplot per axis (`study_plots.plot_panels`); a single panel over all
  runs when no axis is swept."""
  panels = [(axis, [str(r["value"]) for r in rows],
             [r["metrics"] for r in rows])
            for axis, rows in study["per_axis"].items()]
  if not panels:
    panels = [("all runs", ["all"], [_summaries(study["runs"])])]
  plot_panels(panels, path)


def write_study(runs: list[dict], axes: dict[str, list],
                workdir: str) -> dict:
  """Writes study.json, study.md and study.png under workdir, and study_curves.png when
  the workdir's metrics.jsonl (a sweep's log) has losses (`dett_jax.curves`: per stage,
  one loss line per sweep variant); returns the study dict.

  Args:
    runs: one dict per trained run: {"name", "variant": {axis: value},
      "seed": int, "metrics": {"val/worst_group_acc": x, ...}}. A variant may
      leave out an axis (it then counts in no row of that axis).
    axes: the swept axes and their values in order (seeds excluded).
    workdir: output directory (created if missing).

  Returns:
    {"axes", "runs", "per_axis": {axis: [{"value", "n_runs", "metrics"}]},
     "variants": [{"variant", "label", "seeds", "runs", "metrics"}], "best",
     "selection"}, each "metrics" mapping a key of METRICS to {"mean", "std",
     "n"} (fractions; None and n=0 when absent from every run).

  Raises:
    ValueError: empty `runs`, an axis or value not in `axes`, a non-int seed
      or a (variant, seed) pair that occurs twice.
  """
  study = build_study(runs, axes)
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, "study.json"), study)
  _plot(study, os.path.join(workdir, "study.png"))
  curves = write_curves(workdir, "study_curves.png")
  _write_text_atomic(os.path.join(workdir, "study.md"), _markdown(study, curves))
  return study
