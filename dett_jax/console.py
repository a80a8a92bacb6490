"""What `train.py` shows the person at the console (process 0 only).

By default the command line prints progress bars (tqdm, on stderr; on a terminal each
vanishes when its stage ends, see `training.loop`), one line per finished stage (its time and headline metric), warnings,
and at the end the results table and the paths of what the run wrote. Library INFO
records (Orbax, absl, JAX) appear only with `--verbosity=0` (`-v 0`; see train.py).

`enable()` turns the console on (train.py does); until then `say` logs its line at INFO
instead, so code that calls the pipeline from Python (tests, notebooks) stays as quiet
as its logging configuration.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Mapping

from absl import logging

from dett_jax import report
from dett_jax.study import _best_line

_enabled = False


def enable(on: bool = True) -> None:
  """Turns printing to the console on (train.py) or off (back to INFO records)."""
  global _enabled
  _enabled = on


def enabled() -> bool:
  return _enabled


def _primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def say(*lines: str) -> None:
  """Prints `lines` to stdout on process 0 (between tqdm bars, not through them) when the
  console is on; otherwise logs each at INFO."""
  if not _enabled:
    for line in lines:
      logging.info("%s", line)
    return
  if not _primary():
    return
  import tqdm  # pylint: disable=g-import-not-at-top
  for line in lines:
    tqdm.tqdm.write(line, file=sys.stdout)
  sys.stdout.flush()


def duration(seconds: float) -> str:
  """`0.4 s`, `27 s`, `4 min 05 s`, `1 h 02 min`."""
  if seconds < 10:
    return f"{seconds:.1f} s"
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _percent(x: Any) -> str | None:
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return f"{100 * x:.1f}%" if math.isfinite(x) else None


def headline(record: Mapping[str, Any]) -> str:
  """The headline of a stage's record (its `done.json`): worst-group accuracies of a
  trained model, the error set of identification, the throughput and best variant of a
  sweep group; "" for a stage without metrics."""
  metrics = record.get("metrics") or {}
  parts = [f"{label} {value}" for key, label in (("val/worst_group_acc", "val worst group"),
                                                 ("test/worst_group_acc", "test worst group"))
           if (value := _percent(metrics.get(key))) is not None]
  if "error_set" in record:
    size = record.get("size", len(record["error_set"]))
    parts.append(f"error set {size} of {record.get('train_size', '?')} training examples")
  stats = record.get("stats")
  if isinstance(stats, Mapping) and "variants" in stats:
    parts.append(f"{stats['variants']} variant(s), {stats.get('execution', '?')}, "
                 f"{stats.get('compilations', '?')} compilation(s), "
                 f"{stats.get('examples_per_s', 0):.0f} examples/s")
    runs = [r for r in record.get("runs", [])
            if _percent((r.get("metrics") or {}).get("val/worst_group_acc")) is not None]
    if runs:
      best = max(runs, key=lambda r: r["metrics"]["val/worst_group_acc"])
      parts.append(f"best val worst group {_percent(best['metrics']['val/worst_group_acc'])} "
                   f"({best.get('name', '?')})")
  return ", ".join(parts)


def stage_finished(name: str, record: Mapping[str, Any]) -> None:
  """`stage teacher_erm: 27 s, val worst group 67.8%, test worst group 65.0%`."""
  text = headline(record)
  say(f"stage {name}: {duration(float(record.get('seconds', 0.0)))}" + (f", {text}" if text else ""))


def stage_loaded(name: str, record: Mapping[str, Any]) -> None:
  """A stage finished by an earlier run: `stage teacher_erm: done earlier (...)`."""
  text = headline(record)
  say(f"stage {name}: done earlier, outputs loaded" + (f" ({text})" if text else ""))


def align_markdown(table: str) -> list[str]:
  """A markdown table's lines with every column padded to one width (still markdown)."""
  rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
          for line in table.strip().splitlines()]
  if not rows:
    return []
  widths = [max(len(row[i]) for row in rows if i < len(row) and not set(row[i]) <= set("-:"))
            for i in range(len(rows[0]))]
  out = []
  for row in rows:
    if all(set(cell) <= set("-:") for cell in row):
      out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    else:
      out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
  return out


def _existing(workdir: str, *names: str) -> list[str]:
  return [os.path.join(workdir, n) for n in names if os.path.exists(os.path.join(workdir, n))]


def _tensorboard(workdir: str) -> list[str]:
  path = os.path.join(workdir, "tensorboard")
  return [f"TensorBoard: {path}  (tensorboard --logdir {path})"] if os.path.isdir(path) else []


def results(results: Mapping[str, Any], workdir: str) -> None:
  """The end of a pipeline run: report.md's main results table, then the paths of the
  report, the plots, results.json and the TensorBoard logs."""
  models = results.get("models", {})
  groups = report._groups_with_prefix(models, "test/acc/")  # pylint: disable=protected-access
  table = report._main_table(models, groups)  # pylint: disable=protected-access
  workdir = os.path.abspath(workdir)
  plots = [os.path.relpath(p, workdir) for p in _existing(
      workdir, "groups.png", "curves.png",
      *(os.path.join(name, "head_sensitivity.png") for name in models))]
  say("", "Results (accuracy in %; the same table as report.md):", *align_markdown(table), "",
      *[f"report: {p}" for p in _existing(workdir, "report.md")],
      *([f"plots in {workdir}: {', '.join(plots)}"] if plots else []),
      *[f"results: {p}" for p in _existing(workdir, "results.json")],
      *_tensorboard(workdir))


def study(study: Mapping[str, Any] | None, workdir: str) -> None:
  """The end of a sweep: its best variant, and the paths of the study's files."""
  workdir = os.path.abspath(workdir)
  lines = [""]
  if study is not None:
    lines.append(_best_line(study.get("best")).replace("**", "").strip())
  lines += [f"study: {p}" for p in _existing(workdir, "study.md")]
  plots = [os.path.basename(p) for p in _existing(workdir, "study.png", "study_curves.png")]
  lines += [f"plots in {workdir}: {', '.join(plots)}"] if plots else []
  lines += [f"data: {p}" for p in _existing(workdir, "study.json", "sweep_groups.json")]
  say(*lines, *_tensorboard(workdir))
