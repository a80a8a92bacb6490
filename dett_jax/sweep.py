"""Ablation sweeps: many student variants and seeds, stacked into one compiled program.

`python train.py --config=configs/ablation.py --workdir=DIR` (or `run_sweep(config,
workdir)`) trains the teacher stages once, then every variant of `config.sweep.axes`
(the full product, or `config.sweep.subset`), and writes `study.md`, `study.png` and
`study.json` (`dett_jax.study`).

Axes (`config.sweep.axes`, each a tuple of values):
  projector     distill.projector                     shape: its own group
  match         distill.match ("map" / "pooled")       its own group
  transplant    True: method dett; False: dett_no_transplant (trains a head)   its own group
  T_id          identification epochs (one identification stage per value)    stacked*
  lambda_up     distill.lambda_up                      stacked*
  learning_rate distill.optim.learning_rate            stacked (scales the updates)
  seed          student seed (initialises the projector / head)                stacked
  (* with distill.reweight="loss_weight"; with "upsample" they change the data, so each
  value is its own group.)

Variants of one group share every parameter shape and the data order (the config's
seed), so their parameters and optimizer states are stacked on a leading axis, and one
teacher pass per batch serves them all. `config.sweep.execution` chooses how the group
trains:
  vmap  one `jax.vmap`-ed step (`make_stacked_train_step`) trains every variant: one
        compiled program (the accelerator form);
  loop  the teacher's pass, then one compiled plain step trains one variant per device
        column of `sweep.mesh_axis` at a time, dispatched k / columns times per batch
        (`training.looped`): XLA:CPU runs plain convolutions faster than vmapped ones;
  auto  (default) loop on CPU, vmap elsewhere.
`config.sweep.mesh_axis="model"` shards the stacked axis over the mesh's `model` axis
(`mesh.model` devices; the batch is split over `data`), so a pod trains many students at
once; vmapped models then compute 1x1 convolutions as dots, which XLA partitions
correctly in this layout (the group's `models.backend.Backend`). Each group's programs compile
once; its compile time, compilations, examples/s and variant count are logged and
recorded. Students keep their last epoch (no per-variant selection during training);
the study picks the best variant by validation metrics only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dett_jax import console, distributed
from dett_jax.evaluation import accumulate, split_metrics
from dett_jax.experiment import setup_context
from dett_jax.io import write_json_atomic
from dett_jax.methods.base import Method
from dett_jax.data.pipeline import train_batches
from dett_jax.sharding import put, replicate, shard_batch
from dett_jax.stages.builders import backend
from dett_jax.stages.context import Context, run_stage, schedule
from dett_jax.stages.students import identification, reweighting, student_setup
from dett_jax.stages.teachers import pretrain, teachers
from dett_jax.study import write_study
from dett_jax.sweep_axes import (SweepError, check_sweep, execution, group_key, group_variants,
                                 method_of, variant_config, variant_name)
from dett_jax.training.loop import FitSpec, StopSignals, fit
from dett_jax.training.looped import LoopedEvalStep, LoopedTrainStep, pad_variants
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_eval_step, make_stacked_train_step

Tree = Any


def stack(trees: list[Tree]) -> Tree:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Tree, k: int) -> list[Tree]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(k)]


def place_stacked(tree: Tree, mesh, axis: str | None) -> Tree:
  """The stacked tree on the mesh: leading axis over `axis` (when it divides), else replicated."""
  def one(x):
    spec = P(axis) if axis and x.shape[0] % mesh.shape[axis] == 0 else P()
    return put(x, NamedSharding(mesh, spec))
  return jax.tree.map(one, tree)


@dataclasses.dataclass
class Group:
  """One group of stacked variants, ready to train: its method, stacked states, frozen
  tree (with the per-variant `variants` entry), optimizer and data."""

  name: str
  variants: list[dict]
  method: Method
  states: TrainState
  frozen: Tree
  tx: Any
  data: Any
  batch_size: int
  epochs: int
  steps_per_epoch: int
  looped: bool
  axis: str | None


def group_policy(config: ml_collections.ConfigDict, k: int, looped: bool):
  """The backend policy of a group of k stacked variants (see `Backend.stacked`)."""
  return backend(config).stacked(sharded=bool(config.sweep.mesh_axis) and not looped,
                                 vmapped=k > 1 and execution(config) == "vmap",
                                 conv=config.sweep.conv)


def variant_data(ctx: Context, method: Method, configs: list, error_sets: dict[int, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(the shared index list, per-variant example weights `[k, n]`) of a group."""
  n = len(ctx.splits["train"])
  data = [reweighting(ctx, method, error_sets.get(cfg.identification.epochs), cfg.distill.lambda_up)
          for cfg in configs]
  index_list = data[0][0]  # shared: upsampling makes each T_id / lambda_up its own group
  weights = [np.ones(n, np.float32) if w is None else w for _, w in data]
  return (np.arange(n) if index_list is None else index_list), np.stack(weights)


def build_group(ctx: Context, name: str, group: list[dict], pretrained_student: Tree,
                teacher_vars: Tree, teacher_head: Tree, error_sets: dict[int, np.ndarray]) -> Group:
  """The group's method, stacked initial states and placed trees. Variant `seed=s` is
  initialised from `("sweep", "seed", s)` and its loss's randomness from
  `("sweep", "step", s)`: the same whether it trains stacked or alone."""
  config, k = ctx.config, len(group)
  configs = [variant_config(config, v) for v in group]
  first, optim = configs[0], configs[0].distill.optim
  looped = execution(config) == "loop" and k > 1  # one variant: its plain step
  axis = config.sweep.mesh_axis or None
  setups = [student_setup(ctx, method_of(config, group[0]), first, pretrained_student,
                          teacher_vars, teacher_head, ctx.key("sweep", "seed", int(v.get("seed", 0))),
                          group_policy(config, k, looped)) for v in group]
  method, _, frozen = setups[0]
  index_list, weights = variant_data(ctx, method, configs, error_sets)
  batch_size, steps_per_epoch, tx = schedule(config, name, optim, len(index_list), SweepError)
  states = stack([TrainState.create(v["params"], v["collections"], tx) for _, v, _ in setups])
  per_variant = {"weights": weights, "lr_scale": np.array(
      [c.distill.optim.learning_rate / optim.learning_rate for c in configs], np.float32),
      "rng": np.stack([np.asarray(jax.random.key_data(ctx.key("sweep", "step", int(v.get("seed", 0)))))
                       for v in group])}
  if looped:  # one variant per device column at a time: pad k to a multiple of the columns
    states, per_variant = pad_variants((states, per_variant), ctx.mesh.shape[axis] if axis else 1)
    frozen = {**replicate(frozen, ctx.mesh), "variants": place_stacked(per_variant, ctx.mesh, axis)}
  else:
    frozen = replicate({**frozen, "variants": per_variant}, ctx.mesh)
  data = train_batches(ctx.splits["train"], index_list, num_epochs=optim.epochs,
                       global_batch_size=batch_size, seed=ctx.seed("sweep", "data"),
                       preprocess=ctx.preprocess, augment_images=optim.augment,
                       process_index=jax.process_index(), process_count=jax.process_count())
  return Group(name, group, method, place_stacked(states, ctx.mesh, axis), frozen, tx, data,
               batch_size, optim.epochs, steps_per_epoch, looped, axis)


def compile_group(ctx: Context, g: Group) -> tuple[Any, int, Any]:
  """(the compiled step, its number of compilations, the host view of its metrics)."""
  first_batch = shard_batch(g.data[0], ctx.mesh)
  if g.looped:
    step = LoopedTrainStep(g.method, g.tx, ctx.mesh, g.axis, len(g.variants))
    return step.compile(g.states, first_batch, g.frozen), step.compilations, step.host_metrics
  step = jit_train_step(make_stacked_train_step(g.method, g.tx), ctx.mesh, g.states, g.frozen)
  return step.lower(g.states, first_batch, g.frozen).compile(), 1, None


def train_group(ctx: Context, name: str, group: list[dict], pretrained_student: Tree,
                teacher_vars: Tree, teacher_head: Tree, error_sets: dict[int, np.ndarray]
                ) -> tuple[list[dict], dict]:
  """Trains the variants of one group stacked; returns (per-variant records, group stats)."""
  g = build_group(ctx, name, group, pretrained_student, teacher_vars, teacher_head, error_sets)
  k = len(group)
  t0 = time.perf_counter()
  compiled, compilations, host_metrics = compile_group(ctx, g)
  compile_s = time.perf_counter() - t0
  spec = FitSpec(name=name, stage_dir=ctx.stage_dir(name), num_epochs=g.epochs,
                 steps_per_epoch=g.steps_per_epoch, data=g.data,
                 signature={"method": g.method.name, "variants": variant_name_list(group),
                            "batch_size": g.batch_size, "steps_per_epoch": g.steps_per_epoch},
                 host_metrics=host_metrics, **ctx.fit_options())
  t0 = time.perf_counter()
  variables, _ = fit(spec, g.states, compiled, g.frozen, ctx.mesh, ctx.logger)
  train_s = time.perf_counter() - t0
  steps = spec.num_epochs * g.steps_per_epoch
  stats = {"variants": k, "execution": "loop" if g.looped else "vmap",
           "compilations": compilations, "compile_s": compile_s, "train_s": train_s,
           "steps": steps, "examples_per_s": k * steps * g.batch_size / max(train_s, 1e-9)}
  logging.info("sweep group %s: %d variant(s), %s, %d compilation(s) (%.1f s), %.0f examples/s",
               name, k, stats["execution"], compilations, compile_s, stats["examples_per_s"])
  metrics = evaluate_stacked(ctx, g.method, variables, g.frozen, k, g.looped, g.axis)
  records = [{"name": variant_name(v), "variant": {a: x for a, x in v.items() if a != "seed"},
              "seed": int(v.get("seed", 0)), "method": g.method.name, "metrics": m}
             for v, m in zip(group, metrics)]
  return records, stats


def group_stage_name(key: tuple, group: list[dict]) -> str:
  """The group's stage directory: `sweep_` + its shared axis values + a hash of its variant
  list (another subset of variants is another stage, never a stale one)."""
  slug = ",".join(f"{a}={v}" for a, v in key) or "all"
  digest = hashlib.sha1(variant_name_list(group).encode()).hexdigest()[:8]
  return "sweep_" + "".join(c if c.isalnum() or c in "=,._-" else "_" for c in slug) + "_" + digest


def variant_name_list(group: list[dict]) -> str:
  return ";".join(variant_name(v) for v in group)


def evaluate_stacked(ctx: Context, method: Method, variables: Tree, frozen: Tree, k: int,
                     looped: bool = False, axis: str | None = None) -> list[dict]:
  """Val and test metrics of the first k stacked variants: one vmapped eval program, or
  (`looped`) one variant per column of the mesh's `axis` at a time, as they trained."""
  num_groups = ctx.splits["train"].num_groups
  shared = {key: v for key, v in frozen.items() if key != "variants"}
  host_view = None
  if looped:
    eval_step = LoopedEvalStep(method.models, method, num_groups, ctx.mesh, axis, k)
    host_view = eval_step.host_metrics
  else:
    eval_step = jax.jit(jax.vmap(make_eval_step(method.models, method, num_groups),
                                 in_axes=(0, None, None)))
  out = [{} for _ in range(k)]
  for split in ("val", "test"):
    sums = accumulate(eval_step, variables, shared, ctx.splits[split], ctx.mesh,
                      ctx.config.eval_batch_size, ctx.preprocess, ctx.workers, host_view)
    for i in range(k):
      out[i].update(split_metrics({key: v[i] for key, v in sums.items()}, ctx.train_counts,
                                  split, ctx.splits[split].num_attrs))
  return out


def error_sets_of(ctx: Context, selected: list[dict], student_pre: Tree) -> dict[int, np.ndarray]:
  """The error set of every T_id the reweighting variants use (one identification stage each)."""
  out = {}
  for v in selected:
    epochs = variant_config(ctx.config, v).identification.epochs
    if epochs not in out and method_of(ctx.config, v).reweight:
      out[epochs] = np.asarray(identification(ctx, student_pre, epochs)["error_set"], np.int64)
  return out


def train_groups(ctx: Context, selected: list[dict]) -> tuple[list[dict], dict]:
  """Teacher stages once, then every group as its own stage; (records, group stats)."""
  config = ctx.config
  groups = group_variants(selected, config.distill.reweight, config.sweep.stack)
  console.say(f"sweep: {len(selected)} variant(s) in {len(groups)} group(s)")
  _, teacher_vars, distill_head = teachers(ctx)
  student_pre = pretrain(ctx, "student")
  error_sets = error_sets_of(ctx, selected, student_pre)
  records, group_stats = [], {}
  for group in groups:
    name = group_stage_name(group_key(group[0], config.distill.reweight, config.sweep.stack),
                            group)

    def body(group=group, name=name):
      recs, stats = train_group(ctx, name, group, student_pre, teacher_vars, distill_head,
                                error_sets)
      return None, {"runs": recs, "stats": stats}

    _, record = run_stage(ctx, name, None, body)
    records += record["runs"]
    group_stats[name] = {**record["stats"], "stage_s": record["seconds"]}
  return records, group_stats


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Teacher stages once, then every variant group; writes the study; returns it."""
  ctx = setup_context(config, workdir)  # checks the sweep too (validation.validate_config)
  selected = check_sweep(ctx.config)
  axes = {name: tuple(values) for name, values in ctx.config.sweep.axes.items()}
  try:
    with StopSignals():
      records, group_stats = train_groups(ctx, selected)
  finally:
    ctx.logger.close()
  study = None
  if distributed.is_primary():
    study = write_study(records, {a: list(v) for a, v in axes.items() if a != "seed"},
                        ctx.workdir)
    study["groups"] = group_stats
    write_json_atomic(os.path.join(ctx.workdir, "sweep_groups.json"), group_stats)
  distributed.sync("study")
  return {"runs": records, "groups": group_stats, "study": study}
