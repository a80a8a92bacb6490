"""Human-readable reports of evaluation results (markdown table, per-group bar chart and
training curves).

`write_report` expects results of the shape

  {"config": {...},
   "models": {NAME: {"role": "teacher" | "student", "method": M,
                     "metrics": {"test/worst_group_acc": x, ...},
                     "selection": {...}}}}   # "selection" is optional

with metric keys as produced by `dett_jax.metrics`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from dett_jax.curves import write_curves
from dett_jax.io import (replace_atomic as _replace_atomic, to_builtin as _to_builtin,
                         write_text_atomic as _write_text_atomic)

MISSING = "—"

_GROUP_RE = re.compile(r"^group_(\d+)_(\d+)$")


def _to_builtin_or_str(obj: Any) -> Any:
  """Lenient variant of `_to_builtin` for display: falls back to str()."""
  try:
    return _to_builtin(obj)
  except TypeError:
    return str(obj)


def format_percent(x: Any) -> str:
  """Formats a fraction in [0, 1] as a percentage with one decimal ("92.3")."""
  if x is None or not np.isfinite(float(x)):
    return MISSING
  return f"{100.0 * float(x):.1f}"


def format_float(x: Any, digits: int = 3) -> str:
  """Formats a number with `digits` decimals; None/NaN -> "—"."""
  if x is None or not np.isfinite(float(x)):
    return MISSING
  return f"{float(x):.{digits}f}"


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str]) -> str:
  """Renders rows (dicts column -> value) as a markdown table.

  Values are converted with str(); a missing column (or None) shows "—".
  Returns the table text ending with a newline.
  """
  def _cell(value: Any) -> str:
    if value is None:
      return MISSING
    return str(value).replace("|", "\\|").replace("\n", " ")

  lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append(
        "| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _groups_with_prefix(models: Mapping[str, Mapping[str, Any]],
                        prefix: str) -> list[str]:
  """Sorted group names g such that some model has metric prefix + g."""
  found = set()
  for model in models.values():
    for key in model.get("metrics", {}):
      if key.startswith(prefix):
        rest = key[len(prefix):]
        if _GROUP_RE.match(rest):
          found.add(rest)
  return sorted(found, key=lambda g: tuple(
      int(v) for v in _GROUP_RE.match(g).groups()))


def _main_table(models: Mapping[str, Mapping[str, Any]],
                groups: Sequence[str]) -> str:
  columns = ["model", "role", "method", "test worst group", "test average",
             "test adjusted average"]
  columns += [f"test {g}" for g in groups]
  columns.append("val worst group")
  rows = []
  for name, model in models.items():
    m = model.get("metrics", {})
    row = {
        "model": name,
        "role": model.get("role", MISSING),
        "method": model.get("method", MISSING),
        "test worst group": format_percent(m.get("test/worst_group_acc")),
        "test average": format_percent(m.get("test/avg_acc")),
        "test adjusted average": format_percent(m.get("test/adj_avg_acc")),
        "val worst group": format_percent(m.get("val/worst_group_acc")),
    }
    for g in groups:
      row[f"test {g}"] = format_percent(m.get(f"test/acc/{g}"))
    rows.append(row)
  return format_table(rows, columns)


def _diagnostics_table(models: Mapping[str, Mapping[str, Any]]) -> str | None:
  students = {
      name: model for name, model in models.items()
      if model.get("role") == "student" and any(
          k.startswith(("test/agreement", "test/feature_error"))
          for k in model.get("metrics", {}))
  }
  if not students:
    return None
  agree_groups = _groups_with_prefix(students, "test/agreement/")
  feat_groups = _groups_with_prefix(students, "test/feature_error/")
  logit_groups = _groups_with_prefix(students, "test/logit_error/")
  columns = ["model", "method", "agreement"]
  columns += [f"agreement {g}" for g in agree_groups]
  columns.append("feature error")
  columns += [f"feature error {g}" for g in feat_groups]
  columns.append("logit error")
  columns += [f"logit error {g}" for g in logit_groups]
  rows = []
  for name, model in students.items():
    m = model.get("metrics", {})
    row = {
        "model": name,
        "method": model.get("method", MISSING),
        "agreement": format_percent(m.get("test/agreement")),
        "feature error": format_float(m.get("test/feature_error")),
        "logit error": format_float(m.get("test/logit_error")),
    }
    for g in agree_groups:
      row[f"agreement {g}"] = format_percent(m.get(f"test/agreement/{g}"))
    for g in feat_groups:
      row[f"feature error {g}"] = format_float(
          m.get(f"test/feature_error/{g}"))
    for g in logit_groups:
      row[f"logit error {g}"] = format_float(m.get(f"test/logit_error/{g}"))
    rows.append(row)
  return format_table(rows, columns)


def plot_head_sensitivity(name: str, data: Mapping[str, Any], path: str) -> None:
  """`head_sensitivity.png` of one feature-matching student: per feature direction
  (channel of the pooled features), the transplanted head's weight against the teacher
  feature's spread (colour: the student's error relative to that spread), and the
  student's relative error on the directions the head reads most."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top
  weight = np.asarray(data["head_weight"], np.float64)
  std = np.asarray(data["teacher_std"], np.float64)
  rmse = np.asarray(data["student_rmse"], np.float64)
  relative = rmse / np.maximum(std, 1e-12)
  reading = weight * std
  tiny = 1e-8
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
  try:
    points = left.scatter(np.maximum(std, tiny), np.maximum(weight, tiny), c=relative,
                          cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(relative))),
                          s=14 + 120 * reading / max(float(reading.max()), tiny), alpha=0.8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel(f"teacher feature spread (std over {data.get('split', 'val')})")
    left.set_ylabel("head weight |W_c| (class mean removed)")
    left.set_title("Which directions the head reads (size: weight x spread)")
    fig.colorbar(points, ax=left, label="student error / teacher spread")
    order = np.argsort(-reading)[:min(20, len(reading))]
    right.bar(np.arange(len(order)), relative[order], color="tab:red")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_xticks(np.arange(len(order)))
    right.set_xticklabels([str(int(c)) for c in order], fontsize=7, rotation=90)
    right.set_xlabel("channel, by share of the teacher's logit variation (weight x spread)")
    right.set_ylabel("student error / teacher spread")
    right.set_title("Does the student reproduce what the head reads?")
    fig.suptitle(name)
    fig.tight_layout()
    _replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)


def _plot_groups(models: Mapping[str, Mapping[str, Any]],
                 groups: Sequence[str], path: str) -> None:
  """Grouped bar chart of test per-group accuracy, saved atomically."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import PercentFormatter
  # pylint: enable=g-import-not-at-top

  names = list(models)
  num_models = max(len(names), 1)
  x = np.arange(len(groups))
  width = 0.8 / num_models
  fig, ax = plt.subplots(
      figsize=(max(4.0, 1.2 * len(groups) + 0.4 * len(names) + 2.0), 4.0))
  try:
    for i, name in enumerate(names):
      m = models[name].get("metrics", {})
      values = [m.get(f"test/acc/{g}", np.nan) for g in groups]
      values = [np.nan if v is None else float(v) for v in values]
      ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_xlabel("group (class, attribute)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_title("Test accuracy per group")
    if names:
      ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)


def _figures(models: Mapping[str, Mapping[str, Any]], groups: Sequence[str],
             workdir: str) -> list[str]:
  """Writes groups.png and (from the workdir's metrics.jsonl, when it has losses)
  curves.png; returns the report's section showing them inline, each with a link."""
  _plot_groups(models, groups, os.path.join(workdir, "groups.png"))
  parts = ["## Figures\n",
           "Test accuracy per group ([groups.png](groups.png)):\n",
           "![test accuracy per group](groups.png)\n"]
  if write_curves(workdir, "curves.png"):
    parts += ["Training curves ([curves.png](curves.png)): per stage, the training loss per "
              "epoch (mean of the logged losses; one line per variant of a sweep group) and, "
              "where the stage evaluates, the validation worst-group accuracy per epoch "
              "(dashed, right axis).\n",
              "![training curves](curves.png)\n"]
  return parts


def write_report(results: Mapping[str, Any], workdir: str) -> None:
  """Writes report.md, groups.png and curves.png (`dett_jax.curves`: only when the
  workdir has a metrics.jsonl with losses) into `workdir` (each atomically); report.md
  shows the figures inline. Called by process 0 only.

  Args:
    results: {"config": {...}, "models": {NAME: {"role", "method", "metrics",
      optional "selection"}}}; models are listed in dict order.
    workdir: output directory (created if missing).
  """
  os.makedirs(workdir, exist_ok=True)
  models = results.get("models", {})
  groups = _groups_with_prefix(models, "test/acc/")

  parts = ["# DeTT results\n",
           "Accuracies in percent; " + MISSING + " marks a missing metric (e.g. a group "
           "absent from the split); worst group is the minimum over the groups present.\n",
           _main_table(models, groups)]
  parts += _figures(models, groups, workdir)
  diagnostics = _diagnostics_table(models)
  if diagnostics is not None:
    parts += [
        "## Student diagnostics\n",
        "Test agreement with the teacher (percent), relative feature error "
        "sum ||p(f_S) - f_T||^2 / sum ||f_T - mean f_T||^2, and logit error: the same "
        "seen through the transplanted head, sum ||h_T(p(f_S)) - h_T(f_T)||^2 / "
        "sum ||h_T(f_T) - mean h_T(f_T)||^2 (a small feature error can still flip "
        "decisions when the head reads low-variance directions).\n",
        diagnostics,
    ]
  sensitive = [name for name, model in models.items() if model.get("head_sensitivity")]
  for name in sensitive:
    plot_head_sensitivity(name, models[name]["head_sensitivity"],
                          os.path.join(workdir, name, "head_sensitivity.png"))
  if sensitive:
    parts += ["## Head sensitivity\n",
              "Per feature direction: the transplanted head's weight against the "
              "teacher feature's spread, and the student's error on the directions the "
              "head reads (validation split).\n"]
    parts += [f"![{name}]({name}/head_sensitivity.png)\n" for name in sensitive]
  selections = {name: model["selection"] for name, model in models.items()
                if model.get("selection")}
  if selections:
    parts += ["## Model selection\n", "```json",
              json.dumps(selections, indent=2, default=_to_builtin_or_str),
              "```\n"]
  if results.get("config"):
    parts += ["## Config\n", "```json",
              json.dumps(results["config"], indent=2,
                         default=_to_builtin_or_str),
              "```\n"]
  _write_text_atomic(os.path.join(workdir, "report.md"), "\n".join(parts))
