"""Runs the demo pipeline for several seeds and prints mean ± std of every model's metrics.

  python benchmarks/reproduce.py --seeds 3 [--workdir runs/reproduce] [-- extra train.py flags]

Each seed is a separate `train.py` run in `<workdir>/seed_<s>` (finished seeds are
skipped on a re-run). The seed changes training and the generated data
(`seed` and `data.seed`). Prints a markdown table and writes it, with the raw numbers, to
`<workdir>/reproduce.md` and `<workdir>/reproduce.json`.
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
  print(header + table)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "reproduce.md"), "w") as f:
    f.write(header + table)
  write_json_atomic(os.path.join(args.workdir, "reproduce.json"),
                    {"rows": rows, "per_seed": [r["models"] for r in per_seed]})


if __name__ == "__main__":
  main()
