"""Does splitting a CPU host into several XLA devices speed up a DeTT step?

  python benchmarks/cpu_devices.py [--devices 1,2,4] [--steps 10] [--config configs/synthetic.py]

For each device count (one subprocess each, since the count is fixed when jax
starts) it times the demo's DeTT train step (ResNet-18 teacher -> ResNet-10
student, 32 pixels, global batch 128) and prints the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(steps: int, config_path: str) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import importlib.util
  import ml_collections
  from dett_jax import methods
  from dett_jax.models.projector import Projector
  from dett_jax.models.resnet import create_resnet, feature_channels
  from dett_jax.sharding import make_mesh, replicate, shard_batch
  from dett_jax.optimizers import make_optimizer
  from dett_jax.training.state import TrainState
  from dett_jax.training.steps import jit_train_step, make_train_step

  spec = importlib.util.spec_from_file_location("cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  size, batch_size = config.data.image_size, config.batch_size
  teacher = create_resnet(config.teacher.depth, 2, config.teacher.width, config.teacher.stem)
  student = create_resnet(config.student.depth, None, config.student.width, config.student.stem)
  t_ch = feature_channels(config.teacher.depth, config.teacher.width)
  projector = Projector(config.distill.projector, t_ch)
  x = jnp.zeros((1, size, size, 3))
  t_vars = teacher.init(jax.random.key(0), x)
  s_vars = student.init(jax.random.key(1), x)
  fmap = student.apply(s_vars, x)["feature_map"]
  p_vars = projector.init(jax.random.key(2), fmap)
  mesh = make_mesh(-1)
  tx = make_optimizer(config.distill.optim, 100)
  state = replicate(TrainState.create(
      {"student": s_vars["params"], "projector": p_vars["params"]},
      {"student": {"batch_stats": s_vars["batch_stats"]},
       "projector": {"batch_stats": p_vars["batch_stats"]}}, tx), mesh)
  head = t_vars["params"]["head"]
  frozen = replicate({"teacher": t_vars, "teacher_head": head, "head": head}, mesh)
  dett = methods.get("dett")(methods.Models(student=student, projector=projector, teacher=teacher),
                             ml_collections.ConfigDict({"distill": config.distill.to_dict()}))
  step = jit_train_step(make_train_step(dett, tx), mesh, state, frozen)
  rng = np.random.default_rng(0)
  batch = shard_batch({
      "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, 2, batch_size).astype(np.int32),
      "group": np.zeros(batch_size, np.int32), "index": np.arange(batch_size, dtype=np.int32),
      "weight": np.ones(batch_size, np.float32), "mask": np.ones(batch_size, np.float32)}, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, frozen)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return {"devices": jax.device_count(), "compile_s": compile_s,
          "median_step_s": float(np.median(times)), "examples_per_s": batch_size / float(np.median(times))}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", default="1,2,4")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.py"))
  parser.add_argument("--child", type=int, default=0)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.steps, os.path.abspath(args.config))))
    return
  rows = []
  for n in [int(d) for d in args.devices.split(",")]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps),
                          "--config", args.config], env=env, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"measuring {n} devices failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f"DeTT train step, {os.path.basename(args.config)}, {os.cpu_count()} CPU cores\n")
  print("| XLA CPU devices | median step (s) | examples/s | compile (s) |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['devices']} | {r['median_step_s']:.3f} | {r['examples_per_s']:.0f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
