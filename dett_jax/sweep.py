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
correctly in this layout (see `dett_jax.models.conv`). Each group's programs compile
once; its compile time, compilations, examples/s and variant count are logged and
recorded. Students keep their last epoch (no per-variant selection during training);
the study picks the best variant by validation metrics only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dett_jax import distributed
from dett_jax.data.pipeline import example_weights, train_batches, upsampled_indices
from dett_jax.evaluation import accumulate, split_metrics
from dett_jax.methods import METHODS
from dett_jax.optimizers import make_optimizer
from dett_jax.sharding import put, replicate, shard_batch
from dett_jax.training.loop import FitSpec, fit
from dett_jax.training.looped import LoopedEvalStep, LoopedTrainStep, pad_variants
from dett_jax.training.steps import create_state, jit_train_step, make_eval_step, make_stacked_train_step
from dett_jax.validation import ConfigError

AXES = ("method", "projector", "match", "transplant", "head_weight", "T_id", "lambda_up",
        "learning_rate", "epochs", "seed")
# Change the program, the parameter shapes or the schedule's length.
GROUP_AXES = ("method", "projector", "match", "transplant", "head_weight", "epochs")
DATA_AXES = ("T_id", "lambda_up")  # change the data when distill.reweight="upsample"
Tree = Any


class SweepError(ConfigError):
  """A sweep config that cannot work; the message names the field and the fix."""


def check_sweep(config: ml_collections.ConfigDict) -> list[dict]:
  """Raises SweepError for a sweep config that cannot work; returns the selected variants."""
  if config.sweep.get("execution", "auto") not in ("auto", "vmap", "loop"):
    raise SweepError(f"sweep.execution={config.sweep.execution!r}; choose auto, vmap or loop")
  execution(config)  # loop needs one process
  if config.sweep.get("conv", "auto") not in ("auto", "patches", "xla"):
    raise SweepError(f"sweep.conv={config.sweep.conv!r}; choose auto, patches or xla")
  axis = config.sweep.get("mesh_axis")
  if axis and axis not in ("data", "model"):
    raise SweepError(f"sweep.mesh_axis={axis!r}; choose model (or empty: replicated variants)")
  if config.sweep.get("method", "dett") not in METHODS:
    raise SweepError(f"sweep.method={config.sweep.method!r}; choose from {', '.join(METHODS)}")
  axes = {name: tuple(values) for name, values in config.sweep.axes.items()}
  unknown = [m for m in axes.get("method", ()) if m not in METHODS]
  if unknown:
    raise SweepError(f"sweep.axes.method: unknown method(s) {unknown}; choose from "
                     f"{', '.join(METHODS)}")
  if any(int(e) < 1 for e in axes.get("epochs", ())):
    raise SweepError(f"sweep.axes.epochs={list(axes['epochs'])}: every value must be >= 1")
  selected = variants(axes, parse_subset(config.sweep.get("subset", "")))
  if not selected:
    raise SweepError("the sweep selects no variant; check sweep.subset")
  if any(method_of(config, v).objective == "gdro" for v in selected):
    # Its group weights and group-DRO settings are not wired into stacked groups.
    raise SweepError("sweeps do not train gdro students; drop gdro from sweep.method / "
                     "sweep.axes.method (train.py without a sweep trains them: "
                     "--config.distill.methods=gdro)")
  return selected


def variants(axes: dict[str, Sequence], subset: dict[str, Sequence] | None = None) -> list[dict]:
  """Every combination of `axes` values (in order), restricted to `subset`'s values."""
  for name in axes:
    if name not in AXES:
      raise SweepError(f"sweep.axes: unknown axis {name!r}; choose from {', '.join(AXES)}")
    if not len(axes[name]):
      raise SweepError(f"sweep.axes.{name} is empty; list at least one value")
  subset = subset or {}
  for name, values in subset.items():
    if name not in axes:
      raise SweepError(f"sweep.subset names {name!r}, which is not a swept axis "
                       f"({', '.join(axes)})")
    unknown = [v for v in values if v not in tuple(axes[name])]
    if unknown:
      raise SweepError(f"sweep.subset: {name}={unknown} not among the axis values "
                       f"{list(axes[name])}")
  names = list(axes)
  out = []
  for combo in itertools.product(*(axes[n] for n in names)):
    variant = dict(zip(names, combo))
    if all(variant[n] in tuple(v) for n, v in subset.items()):
      out.append(variant)
  return out


def parse_subset(text: str) -> dict[str, list]:
  """'projector=linear,simkd;seed=0,1' -> {"projector": ["linear", "simkd"], "seed": [0, 1]}."""
  out = {}
  for part in filter(None, (p.strip() for p in str(text).split(";"))):
    if "=" not in part:
      raise SweepError(f"sweep.subset: {part!r} is not AXIS=VALUE[,VALUE...]")
    name, values = part.split("=", 1)
    out[name.strip()] = [_parse_value(v.strip()) for v in values.split(",") if v.strip()]
  return out


def _parse_value(text: str) -> Any:
  if text in ("True", "true"):
    return True
  if text in ("False", "false"):
    return False
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def group_key(variant: dict, reweight: str, stack: bool) -> tuple:
  """Variants with equal keys train stacked in one program."""
  if not stack:
    return tuple(sorted(variant.items()))
  axes = GROUP_AXES + (DATA_AXES if reweight == "upsample" else ())
  return tuple((a, variant[a]) for a in axes if a in variant)


def group_variants(variant_list: list[dict], reweight: str, stack: bool = True) -> list[list[dict]]:
  """Variants grouped by `group_key`, groups and members in sweep order."""
  groups: dict[tuple, list[dict]] = {}
  for v in variant_list:
    groups.setdefault(group_key(v, reweight, stack), []).append(v)
  return list(groups.values())


def variant_name(variant: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in variant.items())


def variant_config(config: ml_collections.ConfigDict, variant: dict) -> ml_collections.ConfigDict:
  """`config` with the variant's axis values applied."""
  out = ml_collections.ConfigDict(config.to_dict())
  if "projector" in variant:
    out.distill.projector = variant["projector"]
  if "match" in variant:
    out.distill.match = variant["match"]
  if "lambda_up" in variant:
    out.distill.lambda_up = float(variant["lambda_up"])
  if "learning_rate" in variant:
    out.distill.optim.learning_rate = float(variant["learning_rate"])
  if "T_id" in variant:
    out.identification.epochs = int(variant["T_id"])
  if "head_weight" in variant:
    out.distill.head_weight = float(variant["head_weight"])
  if "epochs" in variant:
    out.distill.optim.epochs = int(variant["epochs"])
  return out


def execution(config: ml_collections.ConfigDict) -> str:
  """`sweep.execution`: "vmap" / "loop", or "auto": loop on CPU in one process, else vmap."""
  setting = config.sweep.get("execution", "auto")
  if setting == "auto":
    return "loop" if jax.default_backend() == "cpu" and jax.process_count() == 1 else "vmap"
  if setting == "loop" and jax.process_count() > 1:  # its rows' metrics are read per process
    raise SweepError("sweep.execution=loop runs in one process; with several, use vmap (or auto)")
  return setting


def use_patches_everywhere(config: ml_collections.ConfigDict, k: int) -> bool:
  """`sweep.conv`: "patches" / "xla", or "auto": patches for vmapped groups (k > 1) on CPU
  (see `dett_jax.models.conv.conv_fn`); looped groups run plain steps (XLA's)."""
  setting = config.sweep.get("conv", "auto")
  if setting == "auto":
    return k > 1 and jax.default_backend() == "cpu" and execution(config) == "vmap"
  return setting == "patches"


def method_of(config: ml_collections.ConfigDict, variant: dict):
  base = variant.get("method", config.sweep.get("method", "dett"))
  if variant.get("transplant") is False:
    base = {"dett": "dett_no_transplant"}.get(base, base)
  return METHODS[base]


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


def train_group(ctx, name: str, group: list[dict], pretrained_student: Tree, teacher_vars: Tree,
                teacher_head: Tree, error_sets: dict[int, np.ndarray]) -> tuple[list[dict], dict]:
  """Trains the variants of one group stacked; returns (per-variant records, group stats)."""
  from dett_jax import experiment  # the stage helpers; imported here to avoid a cycle
  config = ctx.config
  train = ctx.splits["train"]
  configs = [variant_config(config, v) for v in group]
  first = configs[0]
  looped = execution(config) == "loop" and len(group) > 1  # one variant: its plain step
  if config.sweep.get("mesh_axis") and not looped:  # see dett_jax.models.conv: 1x1 convs as dots
    first.pointwise_dot = True
  first.patches_everywhere = use_patches_everywhere(config, len(group))
  method = method_of(config, group[0])
  k = len(group)
  axis = config.sweep.get("mesh_axis") or None
  seeds = [config.seed * 1000 + 500 + int(v.get("seed", 0)) for v in group]
  setups = [experiment.student_setup(ctx, method, first, pretrained_student, teacher_vars,
                                     teacher_head, s) for s in seeds]
  networks, _, frozen = setups[0]
  optim = first.distill.optim
  batch_size = optim.get("batch_size") or config.batch_size
  reweight = config.distill.reweight
  n = len(train)
  if method.reweight and reweight == "upsample":
    index_list = upsampled_indices(n, error_sets[first.identification.epochs],
                                   int(first.distill.lambda_up))
  else:
    index_list = np.arange(n)
  weights = []
  for cfg in configs:
    if method.reweight and reweight == "loss_weight":
      weights.append(example_weights(n, error_sets[cfg.identification.epochs], cfg.distill.lambda_up))
    else:
      weights.append(np.ones(n, np.float32))
  lr_scale = np.array([cfg.distill.optim.learning_rate / optim.learning_rate for cfg in configs],
                      np.float32)
  steps_per_epoch = len(index_list) // batch_size
  if steps_per_epoch < 1:
    raise SweepError(f"{name}: {len(index_list)} training examples give no full batch of "
                     f"{batch_size}; lower the batch size")
  tx = make_optimizer(optim, steps_per_epoch, batch_size)
  states = stack([create_state(v["params"], v["batch_stats"], tx) for _, v, _ in setups])
  per_variant = {"weights": np.stack(weights), "lr_scale": lr_scale}
  if looped:  # one variant per device column at a time: pad k to a multiple of the columns
    columns = ctx.mesh.shape[axis] if axis else 1
    states, per_variant = pad_variants((states, per_variant), columns)
    states = place_stacked(states, ctx.mesh, axis)
    frozen = {**replicate(frozen, ctx.mesh),
              "variants": place_stacked(per_variant, ctx.mesh, axis)}
  else:
    states = place_stacked(states, ctx.mesh, axis)
    frozen = replicate({**frozen, "variants": per_variant}, ctx.mesh)
  data = train_batches(train, index_list, num_epochs=optim.epochs, global_batch_size=batch_size,
                       seed=config.seed * 1000 + 500, preprocess=ctx.preprocess,
                       augment_images=optim.get("augment", config.augment),
                       process_index=jax.process_index(), process_count=jax.process_count())
  t0 = time.perf_counter()
  first_batch = shard_batch(data[0], ctx.mesh)
  host_metrics = None
  if looped:
    step = LoopedTrainStep(networks, method, tx, config.distill, ctx.mesh, axis, k)
    compiled = step.compile(states, first_batch, frozen)
    compilations, host_metrics = step.compilations, step.host_metrics
  else:
    step = jit_train_step(make_stacked_train_step(networks, method, tx, config.distill), ctx.mesh,
                          states, frozen)
    compiled, compilations = step.lower(states, first_batch, frozen).compile(), 1
  compile_s = time.perf_counter() - t0
  spec = FitSpec(name=name, stage_dir=ctx.stage_dir(name), num_epochs=optim.epochs,
                 steps_per_epoch=steps_per_epoch, data=data,
                 signature={"method": method.name, "variants": variant_name_list(group),
                            "batch_size": batch_size, "steps_per_epoch": steps_per_epoch},
                 host_metrics=host_metrics, **ctx.fit_options())
  t0 = time.perf_counter()
  variables, _ = fit(spec, states, compiled, frozen, ctx.mesh, ctx.logger)
  train_s = time.perf_counter() - t0
  steps = optim.epochs * steps_per_epoch
  stats = {"variants": k, "execution": "loop" if looped else "vmap",
           "compilations": compilations, "compile_s": compile_s, "train_s": train_s,
           "steps": steps, "examples_per_s": k * steps * batch_size / max(train_s, 1e-9)}
  logging.info("sweep group %s: %d variant(s), %s, %d compilation(s) (%.1f s), %.0f examples/s",
               name, k, stats["execution"], compilations, compile_s, stats["examples_per_s"])
  metrics = evaluate_stacked(ctx, networks, method, variables, frozen, k, looped, axis)
  records = [{"name": variant_name(v), "variant": {a: x for a, x in v.items() if a != "seed"},
              "seed": int(v.get("seed", 0)), "method": method.name, "metrics": m}
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


def evaluate_stacked(ctx, networks, method, variables: Tree, frozen: Tree, k: int,
                     looped: bool = False, axis: str | None = None) -> list[dict]:
  """Val and test metrics of the first k stacked variants: one vmapped eval program, or
  (`looped`) one variant per column of the mesh's `axis` at a time, as they trained."""
  num_groups = ctx.splits["train"].num_groups
  shared = {key: v for key, v in frozen.items() if key != "variants"}
  host_view = None
  if looped:
    eval_step = LoopedEvalStep(networks, method, num_groups, ctx.mesh, axis, k)
    host_view = eval_step.host_metrics
  else:
    eval_step = jax.jit(jax.vmap(make_eval_step(networks, method, num_groups),
                                 in_axes=(0, None, None)))
  out = [{} for _ in range(k)]
  for split in ("val", "test"):
    sums = accumulate(eval_step, variables, shared, ctx.splits[split], ctx.mesh,
                      ctx.config.eval_batch_size, ctx.preprocess, ctx.workers, host_view)
    for i in range(k):
      out[i].update(split_metrics({key: v[i] for key, v in sums.items()}, ctx.train_counts,
                                  split, ctx.splits[split].num_attrs))
  return out


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Teacher stages once, then every variant group; writes the study; returns it."""
  from dett_jax import experiment
  from dett_jax.study import write_study
  selected = check_sweep(config)
  axes = {name: tuple(values) for name, values in config.sweep.axes.items()}
  groups = group_variants(selected, config.distill.reweight, config.sweep.get("stack", True))
  ctx = experiment.setup_context(config, workdir)
  logging.info("sweep: %d variant(s) in %d group(s)", len(selected), len(groups))
  records, group_stats = [], {}
  try:
    with experiment.StopSignals():
      _, teacher_vars, distill_head = experiment.teachers(ctx)
      student_pre = experiment.pretrain(ctx, "student")
      error_sets = {}
      for v in selected:
        epochs = variant_config(config, v).identification.epochs
        if epochs not in error_sets and method_of(config, v).reweight:
          record = experiment.identification(ctx, student_pre, epochs)
          error_sets[epochs] = np.asarray(record["error_set"], np.int64)
      for group in groups:
        name = group_stage_name(group_key(group[0], config.distill.reweight,
                                          config.sweep.get("stack", True)), group)

        def body(group=group, name=name):
          recs, stats = train_group(ctx, name, group, student_pre, teacher_vars, distill_head,
                                    error_sets)
          return None, {"runs": recs, "stats": stats}

        _, record = experiment.run_stage(ctx, name, None, body)
        records += record["runs"]
        group_stats[name] = {**record["stats"], "stage_s": record["seconds"]}
  finally:
    ctx.logger.close()
  study = None
  if distributed.is_primary():
    study = write_study(records, {a: list(v) for a, v in axes.items() if a != "seed"},
                        ctx.workdir)
    study["groups"] = group_stats
    experiment.write_json_atomic(os.path.join(ctx.workdir, "sweep_groups.json"), group_stats)
  distributed.sync("study")
  return {"runs": records, "groups": group_stats, "study": study}
