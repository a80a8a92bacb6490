"""Runs the demo pipeline for several seeds and prints mean ± std of every model's metrics.

  python benchmarks/reproduce.py --seeds 3 [--workdir runs/reproduce] [-- extra train.py flags]

`--config configs/text_synthetic.py` runs the text demo instead. Each seed is a separate `train.py` run in `<workdir>/seed_<s>` (finished seeds are
skipped on a re-run). The seed changes training and the generated data
(`seed` and `data.seed`). Prints a markdown table and writes it, with the raw numbers, to
`<workdir>/reproduce.md` and `<workdir>/reproduce.json`, with the per-seed differences
that tell the story (debiased teacher - ERM teacher, KD - its teacher, DeTT - its
teacher, DeTT - KD with upsampling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dett_jax.io import write_json_atomic  # noqa: E402
from dett_jax.report import format_table  # noqa: E402

METRICS = ("test/worst_group_acc", "test/avg_acc", "test/adj_avg_acc", "val/worst_group_acc")


def summarize(per_seed: list[dict]) -> list[dict]:
  """Rows of mean ± std (in percent) per model over the seeds' results.json."""
  rows = []
  for name, entry in per_seed[0]["models"].items():
    row = {"model": name, "method": entry["method"]}
    for metric in METRICS:
      values = [100 * r["models"][name]["metrics"][metric] for r in per_seed
                if metric in r["models"].get(name, {}).get("metrics", {})]
      row[metric] = (f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else None)
    rows.append(row)
  return rows


GAPS = (  # (name, minuend, subtrahend): differences of test worst-group accuracy, per seed
    ("debiased teacher - ERM teacher", "teacher_{teacher}", "teacher_erm"),
    ("KD - its teacher", "student_kd", "teacher_{teacher}"),
    ("DeTT - its teacher", "student_dett", "teacher_{teacher}"),
    ("DeTT - KD with upsampling", "student_dett", "student_kd_up"),
    ("dett_head - its teacher", "student_dett_head", "teacher_{teacher}"),
    ("dett_head - KD with upsampling", "student_dett_head", "student_kd_up"),
)


def gaps(per_seed: list[dict], metric: str = "test/worst_group_acc") -> list[dict]:
  """Rows of the GAPS (in points, per seed and mean ± std) where both models were run;
  "its teacher" is the distilled teacher, `distill.teacher` of each seed's config."""
  rows = []
  for name, first, second in GAPS:
    values = []
    for result in per_seed:
      teacher = result["config"]["distill"]["teacher"]
      a, b = first.format(teacher=teacher), second.format(teacher=teacher)
      models = result["models"]
      if a in models and b in models:
        values.append(100 * (models[a]["metrics"][metric] - models[b]["metrics"][metric]))
    if len(values) == len(per_seed):
      rows.append({"gap": name, "per seed": ", ".join(f"{v:+.1f}" for v in values),
                   "mean ± std": f"{np.mean(values):+.1f} ± {np.std(values):.1f}"})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.py"))
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "reproduce"))
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  per_seed = []
  for seed in range(args.seeds):
    workdir = os.path.join(args.workdir, f"seed_{seed}")
    results_path = os.path.join(workdir, "results.json")
    if not os.path.exists(results_path):
      cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={args.config}",
             f"--workdir={workdir}", f"--config.seed={seed}", f"--config.data.seed={seed}", *extra]
      print("running:", " ".join(cmd), flush=True)
      subprocess.run(cmd, check=True)
    with open(results_path) as f:
      per_seed.append(json.load(f))
  rows = summarize(per_seed)
  columns = ["model", "method", *METRICS]
  table = format_table(rows, columns)
  header = (f"Mean ± std over {args.seeds} seeds (accuracy, %), "
            f"`python benchmarks/reproduce.py --seeds {args.seeds}`\n\n")
  gap_rows = gaps(per_seed)
  gap_table = ("\n\nTest worst-group differences, points:\n\n"
               + format_table(gap_rows, ["gap", "per seed", "mean ± std"])) if gap_rows else ""
  print(header + table + gap_table)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "reproduce.md"), "w") as f:
    f.write(header + table + gap_table)
  write_json_atomic(os.path.join(args.workdir, "reproduce.json"),
                    {"rows": rows, "gaps": gap_rows,
                     "per_seed": [r["models"] for r in per_seed]})


if __name__ == "__main__":
  main()
