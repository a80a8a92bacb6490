"""Stacked sweep vs sequential runs: 8 seeds of the demo's DeTT student.

  python benchmarks/sweep_speed.py --workdir runs/ablation   # 8 seeds, the demo's networks
  python benchmarks/sweep_speed.py --ways loop,vmap,sequential --workdir runs/ablation
  python benchmarks/sweep_speed.py --seeds 4 --epochs 1 --config tiny

Trains the teacher stages once (not timed; reused from `--workdir` when already there),
then the same `--seeds` DeTT students once per way in `--ways`, with `dett_jax.sweep`:
  loop        stacked, `sweep.execution=loop` (the CPU default): one teacher pass per
              batch, then one compiled step that trains one variant per device at a time
              (the variants split over the host's devices on the mesh's `model` axis);
  vmap        stacked, `sweep.execution=vmap`: one vmapped program for all variants, the
              same split, convolutions as patches x kernel (`sweep.conv=auto`);
  stacked     `sweep.execution=auto` (loop on CPU, vmap elsewhere);
  sequential  `sweep.stack=False`: one program and one run per seed, one after another,
              in the same process, each on the default data-parallel mesh.
Prints, for each: wall time of the student stages, compilations and compile time,
training examples per second (all students), and each stacked way's speed-up over the
sequential runs; writes JSON with `--json`. The per-seed metrics are compared with the
sequential runs' as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))

WAYS = ("stacked", "loop", "vmap", "sequential")


def run(config, workdir: str, way: str) -> dict:
  """One sweep; stacked: the variants split over the devices (mesh `model` axis); each
  sequential run: the default data-parallel mesh."""
  import jax
  from dett_jax.sweep import execution, run_sweep
  stack = way != "sequential"
  config.sweep.stack = stack
  config.sweep.execution = "auto" if way in ("stacked", "sequential") else way
  devices = jax.device_count()
  config.mesh.data, config.mesh.model = (1, devices) if stack else (-1, 1)
  config.sweep.mesh_axis = "model" if stack and devices > 1 else ""
  way = f"stacked ({execution(config)})" if stack else way
  t0 = time.perf_counter()
  out = run_sweep(config, workdir)
  wall = time.perf_counter() - t0
  groups = out["groups"]
  names = [n for n in groups]
  steps = sum(groups[n]["steps"] * groups[n]["variants"] for n in names)
  train_s = sum(groups[n]["train_s"] for n in names)
  return {"way": way, "wall_s": wall, "groups": len(names),
          "student_wall_s": sum(groups[n]["stage_s"] for n in names),
          "compilations": sum(groups[n]["compilations"] for n in names),
          "compile_s": sum(groups[n]["compile_s"] for n in names), "train_s": train_s,
          "student_steps": steps, "examples_per_s": steps * config.batch_size / max(train_s, 1e-9),
          "metrics": {r["name"]: r["metrics"] for r in out["runs"]}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=0, help="student epochs (0: the config's)")
  parser.add_argument("--config", default="default", choices=("default", "tiny"),
                      help="configs/ablation.py setting: default = the demo's networks and data")
  parser.add_argument("--workdir", default="runs/sweep_speed")
  parser.add_argument("--ways", default="stacked,sequential",
                      help="comma-separated: stacked (sweep.execution=auto), loop, vmap, sequential")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  import ablation
  config = ablation.get_config(args.config)
  from dett_jax.sharding import configure_cpu_devices
  configure_cpu_devices(config.mesh.cpu_devices)  # as train.py: one XLA CPU device per core
  config.sweep.axes = {"projector": (config.distill.projector,), "seed": tuple(range(args.seeds))}
  if args.epochs:
    config.distill.optim.epochs = args.epochs
  workdir = os.path.abspath(args.workdir)
  ways = args.ways.split(",")
  if not ways or any(w not in WAYS for w in ways):
    parser.error(f"--ways={args.ways!r}: choose from {', '.join(WAYS)}")
  results = {}
  for way in ways:  # the first also trains the teacher stages (not counted)
    for d in os.listdir(workdir) if os.path.isdir(workdir) else []:
      if d.startswith("sweep_") and os.path.isdir(os.path.join(workdir, d)):  # students only
        shutil.rmtree(os.path.join(workdir, d))
    r = run(config, workdir, way)
    results[r["way"]] = r
  q = results.get("sequential")
  print(f"\n{args.seeds} seeds of the DeTT student ({args.config} ablation config, "
        f"{config.distill.optim.epochs} epoch(s), batch {config.batch_size}), "
        f"{os.cpu_count()} CPU cores\n")
  print("| way | student stages wall (s) | programs compiled | compile (s) | training (s) "
        "| examples/s |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['student_wall_s']:.1f} | {r['compilations']} | {r['compile_s']:.1f} | "
          f"{r['train_s']:.1f} | {r['examples_per_s']:.0f} |")
  speedups, diffs = {}, {}
  for name, s in results.items():
    if q is None or s is q:
      continue
    speedups[name] = q["student_wall_s"] / s["student_wall_s"]
    diffs[name] = [k for run_name in s["metrics"] for k, v in s["metrics"][run_name].items()
                   if abs(q["metrics"].get(run_name, {}).get(k, float("nan")) - v)
                   > 1e-5 * max(1.0, abs(v))]
    print(f"\n{name} is {speedups[name]:.2f}x faster in total than sequential; per-seed "
          "metrics " + ("agree (1e-5)" if not diffs[name] else
                        f"differ in {len(diffs[name])} of {sum(map(len, s['metrics'].values()))} values"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "speedup": speedups, "metric_differences": diffs}, f, indent=1)


if __name__ == "__main__":
  main()
