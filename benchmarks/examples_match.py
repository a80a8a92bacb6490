"""Do the hand-written Linen and NNX loops (examples/) reach train.py's DeTT result?

  python benchmarks/examples_match.py [--config configs/synthetic.py] [--seed 0] \\
      [--workdir runs/examples_match] [--tolerance 2] [-- extra train.py flags]

1. Runs `train.py` with the config and seed, restricted to the dett method
   (`--config.distill.methods=dett`), unless `<workdir>/results.json` already holds its
   `student_dett` (a finished run is reused).
2. Runs `examples/custom_loop_linen.py --run <workdir>` and `examples/nnx.py --run
   <workdir>`: each takes the run's config, seed, teacher (ERM backbone + DFR head),
   pretrained student backbone and error set, and trains the DeTT student in its own loop
   with the public `dett_jax` API only: `jax.value_and_grad(dett_jax.dett_loss)` in a
   `flax.training.train_state.TrainState` loop (Linen) and in an `nnx.Optimizer` loop
   (NNX student with a `dett_jax.NNXProjector`), on train.py's batches
   (`dett_jax.epoch_batches` with the run's data seed) from its initial projector.
3. Prints a table of test worst-group accuracies and whether each example is within
   `--tolerance` points of train.py's `student_dett`; writes it, with the raw numbers, to
   `<workdir>/examples_match.md` and `.json`; the last line printed is JSON. `--strict`
   exits with status 1 when an example is not within the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("custom_loop_linen", "nnx")
METRICS = ("test/worst_group_acc", "test/avg_acc", "val/worst_group_acc")


def train_py(args: argparse.Namespace, extra: list[str]) -> float:
  """Runs train.py (dett only) into the workdir; returns its wall-clock seconds."""
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={args.config}",
         f"--workdir={args.workdir}", "--config.distill.methods=dett",
         f"--config.seed={args.seed}", *extra]
  print("running:", " ".join(cmd), flush=True)
  start = time.time()
  subprocess.run(cmd, check=True)
  return time.time() - start


def run_example(name: str, args: argparse.Namespace) -> dict:
  """Runs examples/<name>.py on the workdir; returns its final JSON line."""
  cmd = [sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--run", args.workdir]
  if args.steps:
    cmd += ["--steps", str(args.steps)]
  print("running:", " ".join(cmd), flush=True)
  start = time.time()
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["wall_seconds"] = time.time() - start
  return result


def table(rows: list[dict]) -> str:
  lines = ["| run | test worst group | test average | val worst group | difference to train.py "
           "(points) | within tolerance | seconds |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    cells = [row["run"], *(f"{100 * row[m]:.2f}" for m in METRICS),
             "-" if row["difference"] is None else f"{row['difference']:+.2f}",
             "-" if row["within"] is None else ("yes" if row["within"] else "no"),
             "-" if row["seconds"] is None else f"{row['seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.py"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "examples_match"))
  parser.add_argument("--tolerance", type=float, default=2.0, help="points of worst-group accuracy")
  parser.add_argument("--steps", type=int, default=0, help="examples train only this many steps "
                      "(a smoke test; the comparison needs the full schedule)")
  parser.add_argument("--strict", action="store_true", help="exit 1 unless every example is within")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  args.workdir = os.path.abspath(args.workdir)
  results_path = os.path.join(args.workdir, "results.json")
  train_seconds = None
  if not os.path.exists(results_path):
    train_seconds = train_py(args, extra)
  with open(results_path) as f:
    reference = json.load(f)["models"]["student_dett"]["metrics"]
  rows = [{"run": "train.py (student_dett)", **{m: reference[m] for m in METRICS},
           "difference": None, "within": None, "seconds": train_seconds}]
  for name in EXAMPLES:
    result = run_example(name, args)
    difference = 100 * (result["test/worst_group_acc"] - reference["test/worst_group_acc"])
    rows.append({"run": f"examples/{name}.py", **{m: result[m] for m in METRICS},
                 "difference": difference, "within": abs(difference) <= args.tolerance,
                 "seconds": result["wall_seconds"]})
  text = table(rows)
  print(text)
  summary = {"workdir": args.workdir, "seed": args.seed, "config": args.config,
             "tolerance_points": args.tolerance, "rows": rows,
             "all_within": all(r["within"] for r in rows[1:])}
  with open(os.path.join(args.workdir, "examples_match.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.workdir, "examples_match.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary))
  return 1 if args.strict and not summary["all_within"] else 0


if __name__ == "__main__":
  sys.exit(main())
