"""The DeTT pipeline, stage by stage: pretrain -> ERM teacher -> debiased teachers (DFR,
group DRO: `teacher.debias`) -> identification -> students -> results.json / report.md /
groups.png.

Every stage writes its outputs under `<workdir>/<stage>/` and a `done.json` last;
a re-run skips finished stages and resumes an interrupted one from its latest
checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
from absl import logging
from jax.sharding import Mesh

from dett_jax import dfr, distributed
from dett_jax.checkpoints import (load_backbone, load_variables, mark_done, save_variables,
                                  stage_done)
from dett_jax.data import (Preprocess, Split, load_splits, pretraining_classes,
                           pretraining_set)
from dett_jax.data.pipeline import (eval_batches, example_weights, train_batches,
                                    upsampled_indices)
from dett_jax.evaluation import accumulate, head_sensitivity, split_metrics
from dett_jax.methods import METHODS, Method, get_method, parse_debias
from dett_jax.models.conv import use_patches
from dett_jax.models.projector import Projector
from dett_jax.models.resnet import create_resnet, feature_channels
from dett_jax.optimizers import make_optimizer
from dett_jax.report import write_json_atomic, write_report
from dett_jax.sharding import make_mesh, place, replicate, shard_batch
from dett_jax.teacher_cache import open_cache, write_cache
from dett_jax.training.loop import (FitSpec, Interrupted, MetricLogger, StopSignals, fit,
                                    stop_requested)
from dett_jax.training.steps import (Networks, create_state, jit_train_step,
                                     make_eval_step, make_train_step)
from dett_jax.validation import (check_schedules, check_workdir_config, check_workdir_writable,
                                 validate_config)

ERM = Method("erm", "ce", reweight=False, transplant=False)
Tree = Any


# ---------------------------------------------------------------------------
# Small builders.
# ---------------------------------------------------------------------------

def init_model(model: Any, image_size: int, seed: int) -> dict[str, Tree]:
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, image_size, image_size, 3))))
  variables = run_once(init, jax.random.key(seed))
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def run_once(fn: Callable, *args: Any) -> Any:
  """`fn(*args)` for a jitted function run once (initialisers): on CPU compiled without
  LLVM optimisation, which XLA:CPU otherwise spends 15-20 s on for a ResNet's unrolled
  random-number code (the values differ from an optimised build in the last bits)."""
  if jax.default_backend() != "cpu":
    return fn(*args)
  return fn.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def with_new_head(variables: Tree, num_classes: int | None, seed: int) -> Tree:
  """Pretrained ResNet variables (with some head) with a freshly initialised Dense head
  of `num_classes` outputs (as `nn.Dense` initialises it), or none when it is None."""
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  if num_classes:
    width = variables["params"]["head"]["kernel"].shape[0]
    params["head"] = {
        "kernel": nn.initializers.lecun_normal()(jax.random.key(seed), (width, num_classes)),
        "bias": jnp.zeros((num_classes,), jnp.float32)}
  return {"params": params, "batch_stats": variables["batch_stats"]}


@dataclasses.dataclass
class Context:
  """What every stage needs: config, data, mesh, jitted-function cache, logger."""

  config: ml_collections.ConfigDict
  workdir: str
  splits: dict[str, Split]
  mesh: Mesh
  logger: MetricLogger
  preprocess: Preprocess
  memo: dict = dataclasses.field(default_factory=dict)  # values computed once per run

  def place(self, tree: Tree) -> Tree:
    """`tree` on the mesh, sharded by the config's strategy and rules (FSDP or replicated)."""
    return place(tree, self.mesh, self.config.mesh.get("strategy", "replicated"),
                 tuple(self.config.mesh.get("rules", ())))

  def fit_options(self) -> dict[str, Any]:
    """The `FitSpec` fields every stage takes from the config (logging, checkpoints,
    the divergence policy, loader workers, `stop_after_steps`)."""
    config = self.config
    return dict(log_every_steps=config.log_every_steps,
                checkpoint_every_steps=config.checkpoint_every_steps,
                checkpoint_every_minutes=config.get("checkpoint_every_minutes", 0.0),
                keep_checkpoints=config.get("keep_checkpoints", 2),
                on_nonfinite=config.get("on_nonfinite", "stop"), workers=self.workers,
                stop_after_steps=config.get("stop_after_steps") or None)

  @property
  def workers(self) -> int:
    return self.config.data.get("workers", 0)

  @property
  def train_counts(self) -> np.ndarray:
    return self.splits["train"].group_counts()

  def stage_dir(self, name: str) -> str:
    path = os.path.join(self.workdir, name)
    os.makedirs(path, exist_ok=True)
    return path


def evaluate(ctx: Context, eval_step: Any, variables: Tree, frozen: Tree, splits=("val", "test"),
             sums_out: dict | None = None) -> dict[str, float]:
  """Metrics of `splits`; `sums_out`, when given, receives each split's summed step outputs."""
  metrics = {}
  for split in splits:
    sums = accumulate(eval_step, variables, frozen, ctx.splits[split], ctx.mesh,
                      ctx.config.eval_batch_size, ctx.preprocess, ctx.workers)
    metrics.update(split_metrics(sums, ctx.train_counts, split, ctx.splits[split].num_attrs))
    if sums_out is not None:
      sums_out[split] = sums
  return metrics


def train_model(ctx: Context, name: str, networks: Networks, method: Method, variables: Tree,
                frozen: Tree, split: Split, optim: Any, *, index_list: np.ndarray | None = None,
                weights: np.ndarray | None = None, select_metric: str | None = None,
                eval_step: Any = None, seed_offset: int = 0,
                cached: dict[str, np.ndarray] | None = None) -> tuple[Tree, dict]:
  """Trains `variables` on `split` with `method`; returns (selected variables, summary).

  `cached`: per-example teacher outputs to put in each batch (the step then skips the
  teacher), see `teacher_cache`.
  """
  config = ctx.config
  index_list = np.arange(len(split)) if index_list is None else index_list
  batch_size = optim.get("batch_size") or config.batch_size
  steps_per_epoch = len(index_list) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{name}: {len(index_list)} training examples give no full batch of "
                     f"{batch_size}; lower the batch size")
  tx = make_optimizer(optim, steps_per_epoch, batch_size)
  # Copy: the step donates its state, and `variables` may share buffers with the caller's.
  variables = jax.tree.map(jnp.copy, variables)
  state = ctx.place(create_state(variables["params"], variables["batch_stats"], tx))
  frozen = ctx.place(frozen)
  step_fn = jit_train_step(make_train_step(networks, method, tx, step_config(ctx, method)),
                           ctx.mesh, state, frozen)
  seed = config.seed * 1000 + seed_offset

  data = train_batches(split, index_list, num_epochs=optim.epochs,
                       global_batch_size=batch_size, seed=seed, preprocess=ctx.preprocess,
                       augment_images=optim.get("augment", config.augment), weights=weights,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       cached=cached)

  evaluate_fn = None
  if select_metric is not None:
    evaluate_fn = lambda v: evaluate(ctx, eval_step, v, frozen, splits=("val",))
  spec = FitSpec(name=name, stage_dir=ctx.stage_dir(name), num_epochs=optim.epochs,
                 steps_per_epoch=steps_per_epoch, data=data, evaluate=evaluate_fn,
                 select_metric=select_metric,
                 signature={"method": method.name, "seed": seed, "batch_size": batch_size,
                            "steps_per_epoch": steps_per_epoch,
                            **{f"optim.{k}": v for k, v in optim.items()}},
                 **ctx.fit_options())
  return fit(spec, state, step_fn, frozen, ctx.mesh, ctx.logger)


def resnet(config: ml_collections.ConfigDict, role: str, num_classes: int | None):
  """The ResNet of `config[role]` ("teacher" or "student") in the config's precision."""
  cfg = config[role]
  return create_resnet(cfg.depth, num_classes, cfg.width, cfg.stem, dtype=compute_dtype(config),
                       small_map_conv=small_map_conv(config),
                       pointwise_dot=config.get("pointwise_dot", False),
                       patches_everywhere=config.get("patches_everywhere", False))


def small_map_conv(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.small_map_conv` ("auto": on CPU) computes small-map convs as dots."""
  return use_patches(config.get("small_map_conv", "auto"))


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """Activation/matmul dtype of `config.precision` (parameters stay float32)."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.get("precision", "float32")]


def erm_networks(model) -> Networks:
  return Networks(student=model)


def wrap(variables: Tree) -> Tree:
  """ResNet variables -> the {"student": ...} layout the steps use."""
  return {"params": {"student": variables["params"]},
          "batch_stats": {"student": variables["batch_stats"]}}


def unwrap(variables: Tree) -> Tree:
  return {"params": variables["params"]["student"],
          "batch_stats": variables["batch_stats"]["student"]}


def with_gdro_weights(variables: Tree, num_groups: int) -> Tree:
  """Step-layout variables with group DRO's weights q = 1/G added as
  `batch_stats["gdro"]["q"]` `[G]`: state the optimizer never sees, checkpointed and
  restored with the rest (see `training.steps.gdro_loss`)."""
  q = jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)
  return {"params": variables["params"], "batch_stats": {**variables["batch_stats"],
                                                         "gdro": {"q": q}}}


def step_config(ctx: Context, method: Method) -> Any:
  """The train step's loss settings: `config.distill`, plus for group DRO the step size
  `gdro_eta` (`config.gdro.eta`) and the adjustment `gdro_adjustment` `[G]`
  (`config.gdro.adjustment` / sqrt(training group counts)). The teacher and the student
  share `config.gdro`."""
  config = ctx.config
  if method.objective != "gdro":
    return config.distill
  gdro = config.get("gdro") or ml_collections.ConfigDict(dict(eta=0.01, adjustment=0.0))
  out = ml_collections.ConfigDict(config.distill.to_dict())
  out.gdro_eta = float(gdro.eta)
  counts = np.maximum(np.asarray(ctx.train_counts, np.float64), 1.0)
  out.gdro_adjustment = tuple(float(a) for a in float(gdro.adjustment) / np.sqrt(counts))
  return out


def run_stage(ctx: Context, name: str, template: Tree | None, body) -> tuple[Tree | None, dict]:
  """Runs `body() -> (variables, record)` unless the stage is done; loads its outputs if so."""
  stage_dir = ctx.stage_dir(name)
  record = stage_done(stage_dir)
  received = stop_requested()
  if distributed.any_process(received is not None) and record is None:  # all processes agree
    raise Interrupted(f"stopped before stage {name} (signal {received}); re-run the same "
                      "command to resume")
  if record is not None:
    logging.info("stage %s: done, loading its outputs", name)
    variables = None
    if template is not None:
      variables = load_variables(os.path.join(stage_dir, "final"), replicate(template, ctx.mesh))
    return variables, record
  start = time.time()
  distributed.note_progress(stage=name)
  variables, record = body()
  record["seconds"] = time.time() - start
  if variables is not None:
    save_variables(os.path.join(stage_dir, "final"), variables)
  mark_done(stage_dir, record)
  logging.info("stage %s: finished in %.1fs", name, record["seconds"])
  return variables, record


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------

def pretrain(ctx: Context, role: str) -> Tree:
  """ResNet of `role` ("teacher" or "student") trained on the unbiased pretraining task."""
  config = ctx.config
  arch = config.teacher if role == "teacher" else config.student
  model = resnet(config, role, pretraining_classes(config.data))
  seed_offset = 1 if role == "teacher" else 2
  initial = init_model(model, config.data.image_size, config.seed * 1000 + seed_offset)
  if arch.get("init"):
    logging.info("%s: backbone from %s", role, arch.init)
    return load_backbone(arch.init, initial)
  if not config.pretrain.enabled:
    logging.warning("%s: no pretraining and no %s.init checkpoint; starting from random "
                    "weights (the reference setting starts from ImageNet weights)", role, role)
    return initial

  def body():
    data = pretraining_set(config.data, config.pretrain.size)
    variables, summary = train_model(ctx, f"pretrain_{role}", erm_networks(model), ERM,
                                     wrap(initial), {}, data, config.pretrain[role],
                                     seed_offset=seed_offset)
    return unwrap(variables), {"history": summary["history"]}

  variables, _ = run_stage(ctx, f"pretrain_{role}", initial, body)
  return variables


def teacher_eval_step(ctx: Context, model) -> Any:
  return jax.jit(make_eval_step(Networks(student=None, teacher=model), None,
                                ctx.splits["train"].num_groups))


def teacher_frozen(variables: Tree, head: Tree | None = None) -> Tree:
  return {"teacher": variables, "teacher_head": head or variables["params"]["head"]}


def teacher_erm(ctx: Context, pretrained: Tree | None) -> tuple[Tree, dict]:
  """ERM teacher (fine-tuned from the pretrained backbone), or the user's checkpoint."""
  config = ctx.config
  model = resnet(config, "teacher", ctx.splits["train"].num_classes)
  if pretrained is None:  # a checkpoint will fill it
    template = init_model(model, config.data.image_size, config.seed * 1000 + 3)
  else:
    template = with_new_head(pretrained, model.num_classes, config.seed * 1000 + 3)
  eval_step = teacher_eval_step(ctx, model)

  def body():
    if config.teacher.checkpoint:
      variables = load_variables(config.teacher.checkpoint, replicate(template, ctx.mesh))
      summary = {"source": os.path.abspath(config.teacher.checkpoint)}
    else:
      variables, summary = train_model(ctx, "teacher_erm", erm_networks(model), ERM,
                                       wrap(template), {}, ctx.splits["train"],
                                       config.teacher.optim, seed_offset=3)
      variables = unwrap(variables)
    metrics = evaluate(ctx, eval_step, None, teacher_frozen(variables))
    return variables, {"metrics": metrics, **summary}

  return run_stage(ctx, "teacher_erm", template, body)


def per_example(ctx: Context, fn: Any, variables: Tree, split: Split) -> np.ndarray:
  """`fn(variables, images)` over every example of `split` (no augmentation), `[n, ...]`.

  Each process loads its slice of every batch; the outputs are gathered, so every
  process returns the whole array (a collective: all processes must call it).
  """
  fn = jax.jit(fn)
  chunks = []
  for batch in eval_batches(split, global_batch_size=ctx.config.eval_batch_size,
                            preprocess=ctx.preprocess, process_index=jax.process_index(),
                            process_count=jax.process_count(), workers=ctx.workers):
    batch = shard_batch({k: batch[k] for k in ("image", "index", "mask")}, ctx.mesh)
    chunks.append((fn(variables, batch["image"]), batch["index"], batch["mask"]))
  out, index, mask = (np.concatenate(parts) for parts in zip(*distributed.to_host(chunks)))
  keep = mask > 0
  assert keep.sum() == len(split) and np.array_equal(np.sort(index[keep]), np.arange(len(split)))
  result = np.empty((len(split),) + out.shape[1:], out.dtype)
  result[index[keep]] = out[keep]
  return result


def embeddings(ctx: Context, model, variables: Tree, split: Split) -> np.ndarray:
  """Pooled penultimate features `[n, d]` of `split`."""
  return per_example(ctx, lambda v, x: model.apply(v, x, train=False)["features"], variables, split)


def teacher_dfr(ctx: Context, erm_variables: Tree) -> tuple[Tree, dict]:
  """DFR: the ERM teacher's backbone with a last layer refit on balanced validation data."""
  config = ctx.config
  model = resnet(config, "teacher", ctx.splits["train"].num_classes)
  template = jax.tree.map(jnp.zeros_like, erm_variables["params"]["head"])

  def body():
    val = ctx.splits["val"]
    result = dfr.fit_dfr(embeddings(ctx, model, erm_variables, val), val.labels, val.groups,
                         num_classes=val.num_classes, c_grid=tuple(config.teacher.dfr_c_grid),
                         num_refits=config.teacher.dfr_num_refits, seed=config.seed)
    head = replicate(dfr.dense_params(result), ctx.mesh)
    metrics = evaluate(ctx, teacher_eval_step(ctx, model), None, teacher_frozen(erm_variables, head))
    return head, {"metrics": metrics, "selection": {
        "metric": "dfr/half_val_worst_group_acc", "best_c": result.best_c,
        "c_scores": {str(k): v for k, v in result.c_scores.items()}}}

  return run_stage(ctx, "teacher_dfr", template, body)


def teacher_gdro(ctx: Context, pretrained: Tree) -> tuple[Tree, dict]:
  """Group-DRO teacher (Sagawa et al. 2020): the teacher architecture fine-tuned from the
  pretrained backbone with group-DRO cross-entropy on the training group labels
  (`config.gdro`, `teacher.optim`), selected like the students (`distill.select`). Its
  backbone and head are both its own."""
  config = ctx.config
  train = ctx.splits["train"]
  model = resnet(config, "teacher", train.num_classes)
  template = with_new_head(pretrained, model.num_classes, config.seed * 1000 + 5)
  eval_step = teacher_eval_step(ctx, model)

  def body():
    select = "val/worst_group_acc" if config.distill.select == "val_worst_group" else None
    select_step = jax.jit(make_eval_step(erm_networks(model), ERM, train.num_groups,
                                         diagnostics=False))
    variables, summary = train_model(ctx, "teacher_gdro", erm_networks(model), METHODS["gdro"],
                                     with_gdro_weights(wrap(template), train.num_groups), {},
                                     train, config.teacher.optim, select_metric=select,
                                     eval_step=select_step, seed_offset=5)
    q = np.asarray(distributed.to_host(variables["batch_stats"]["gdro"]["q"]), np.float64)
    variables = unwrap(variables)
    metrics = evaluate(ctx, eval_step, None, teacher_frozen(variables))
    return variables, {"metrics": metrics, "selection": summary["selection"],
                       "group_weights": q.tolist(), "history": summary["history"]}

  return run_stage(ctx, "teacher_gdro", template, body)


def teachers(ctx: Context) -> tuple[dict[str, dict], Tree, Tree]:
  """The teacher stages: ERM, then the debiased teachers of `teacher.debias` (DFR: the
  ERM backbone with a refit head; group DRO: its own backbone and head). Returns (their
  `models` entries of results.json, the distilled teacher's variables, its head), the
  distilled teacher being `distill.teacher`'s."""
  config = ctx.config
  debias = parse_debias(config.teacher.get("debias", "dfr"))
  teacher_pre = None if config.teacher.checkpoint else pretrain(ctx, "teacher")
  erm_vars, erm_record = teacher_erm(ctx, teacher_pre)
  models = {"teacher_erm": {"role": "teacher", "method": "erm", "metrics": erm_record["metrics"]}}
  distilled = {"erm": (erm_vars, erm_vars["params"]["head"])}
  if "dfr" in debias:
    head, dfr_record = teacher_dfr(ctx, erm_vars)
    models["teacher_dfr"] = {"role": "teacher", "method": "dfr", "metrics": dfr_record["metrics"],
                             "selection": dfr_record["selection"]}
    distilled["dfr"] = (erm_vars, head)
  if "gdro" in debias:
    gdro_vars, gdro_record = teacher_gdro(ctx, teacher_pre)
    models["teacher_gdro"] = {"role": "teacher", "method": "gdro",
                              "metrics": gdro_record["metrics"],
                              "selection": gdro_record["selection"]}
    distilled["gdro"] = (gdro_vars, gdro_vars["params"]["head"])
  teacher_vars, head = distilled[config.distill.teacher]
  return models, teacher_vars, head


def identification(ctx: Context, pretrained_student: Tree, epochs: int | None = None) -> dict:
  """ERM model of the student's architecture trained T_id epochs (`epochs`, default
  `identification.epochs`); its training errors. Another T_id is its own stage,
  `identification_T<epochs>` (sweeps)."""
  config = ctx.config
  train = ctx.splits["train"]
  optim = config.identification
  stage = "identification"
  if epochs is not None and epochs != optim.epochs:
    optim = ml_collections.ConfigDict({**optim.to_dict(), "epochs": int(epochs)})
    stage = f"identification_T{int(epochs)}"
  model = resnet(config, "student", train.num_classes)
  initial = with_new_head(pretrained_student, model.num_classes, config.seed * 1000 + 4)

  def body():
    variables, _ = train_model(ctx, stage, erm_networks(model), ERM, wrap(initial), {},
                               train, optim, seed_offset=4)
    pred = per_example(ctx, lambda v, x: jnp.argmax(model.apply(v, x, train=False)["logits"], -1),
                       unwrap(variables), train)
    error_set = np.flatnonzero(pred != train.labels)
    record = {
        "error_set": error_set.tolist(),
        "size": int(len(error_set)),
        "train_size": len(train),
        "settings": {"T_id": optim.epochs, "depth": config.student.depth,
                     "width": config.student.width, "seed": config.seed,
                     "learning_rate": optim.learning_rate},
        # Diagnostics only (group labels are never used by the methods).
        "error_set_group_counts": np.bincount(train.groups[error_set],
                                              minlength=train.num_groups).tolist(),
        "train_group_counts": train.group_counts().tolist(),
    }
    if distributed.is_primary():  # every process computed the same record; one writes it
      write_json_atomic(os.path.join(ctx.stage_dir(stage), "error_set.json"), record)
    return None, record

  _, record = run_stage(ctx, stage, None, body)
  return record


def teacher_cache(ctx: Context, model, variables: Tree, head: Tree) -> dict[str, np.ndarray]:
  """The teacher's feature maps and logits (with `head`) for every training example, as
  the un-augmented training pipeline feeds them; computed once into
  `<workdir>/teacher_cache/` in the config's precision, then memory-mapped."""
  directory = os.path.join(ctx.workdir, "teacher_cache")
  cached = open_cache(directory)
  if cached is None:
    dtype = compute_dtype(ctx.config)
    fmap = per_example(ctx, lambda v, x: model.apply(v, x, train=False)["feature_map"].astype(dtype),
                       variables, ctx.splits["train"])
    features = fmap.astype(np.float32).mean(axis=(1, 2))
    logits = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    if distributed.is_primary():
      write_cache(directory, {"teacher_feature_map": fmap, "teacher_logits": logits})
    distributed.sync("teacher_cache")
    cached = open_cache(directory)
    logging.info("teacher cache: %s feature maps %s written to %s",
                 len(fmap), fmap.shape[1:], directory)
  return cached


def student_setup(ctx: Context, method: Method, config: ml_collections.ConfigDict,
                  pretrained_student: Tree, teacher_vars: Tree, teacher_head: Tree,
                  seed: int) -> tuple[Networks, Tree, Tree]:
  """(networks, initial variables, frozen tree) of `method`'s student under `config`
  (projector, precision); `seed` initialises what is not pretrained (projector, head)."""
  train = ctx.splits["train"]
  teacher_model = resnet(config, "teacher", train.num_classes)
  t_channels = feature_channels(config.teacher.depth, config.teacher.width)
  if method.objective == "feature":
    model = resnet(config, "student", None)
    projector = Projector(config.distill.projector, t_channels, config.distill.projector_factor,
                          dtype=compute_dtype(config), small_map_conv=small_map_conv(config),
                          pointwise_dot=config.get("pointwise_dot", False),
                       patches_everywhere=config.get("patches_everywhere", False))
    backbone = with_new_head(pretrained_student, None, seed)
    s_shape = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(
        (1, config.data.image_size, config.data.image_size, 3)))["feature_map"], backbone)
    p_vars = projector.init(jax.random.key(seed), jnp.zeros(s_shape.shape))
    params = {"student": backbone["params"], "projector": p_vars.get("params", {})}
    if method.trains_head:
      params["head"] = {"kernel": jnp.zeros_like(teacher_head["kernel"]),
                        "bias": jnp.zeros_like(teacher_head["bias"])}
    variables = {"params": params, "batch_stats": {"student": backbone["batch_stats"],
                                                  "projector": p_vars.get("batch_stats", {})}}
  else:
    model, projector = resnet(config, "student", train.num_classes), None
    variables = wrap(with_new_head(pretrained_student, model.num_classes, seed))
    if method.objective == "gdro":
      variables = with_gdro_weights(variables, train.num_groups)
  networks = Networks(student=model, projector=projector, teacher=teacher_model)
  frozen = {"teacher": teacher_vars, "teacher_head": teacher_head}
  if method.transplant:
    frozen["head"] = teacher_head
  if method.standardize:
    frozen["feature_scale"] = teacher_feature_scale(ctx, teacher_model, teacher_vars)
  return networks, variables, frozen


def teacher_feature_scale(ctx: Context, model, variables: Tree) -> jax.Array:
  """1 / the per-channel standard deviation `[c]` of the teacher's feature maps over the
  training split (every position, no augmentation): `dett_std`'s scale. Computed once
  per teacher and run (kept on `ctx`)."""
  key = ("feature_scale", id(variables))
  if key not in ctx.memo:
    def moments(v, x):
      fmap = model.apply(v, x, train=False)["feature_map"].astype(jnp.float32)
      return jnp.stack([jnp.mean(fmap, (1, 2)), jnp.mean(jnp.square(fmap), (1, 2))], 1)
    m = per_example(ctx, moments, variables, ctx.splits["train"]).astype(np.float64).mean(0)
    std = np.sqrt(np.maximum(m[1] - m[0] ** 2, 0.0))
    ctx.memo[key] = jnp.asarray(1.0 / np.maximum(std, 1e-6 * max(float(std.max()), 1e-12)),
                                jnp.float32)
  return ctx.memo[key]


def student(ctx: Context, method: Method, pretrained_student: Tree, teacher_vars: Tree,
            teacher_head: Tree, error_set: np.ndarray) -> dict:
  """Trains and evaluates the student of `method`; returns its results entry."""
  config, train = ctx.config, ctx.splits["train"]
  name = f"student_{method.name}"
  seed_offset = 10 + list(METHODS).index(method.name)
  seed = config.seed * 1000 + seed_offset
  networks, variables, frozen = student_setup(ctx, method, config, pretrained_student,
                                              teacher_vars, teacher_head, seed)
  teacher_model = networks.teacher
  eval_step = jax.jit(make_eval_step(networks, method, train.num_groups))
  # Selection evaluates val each epoch; with a teacher, its diagnostics (agreement, feature
  # and logit error) go to metrics.jsonl and TensorBoard too.
  select_step = eval_step if method.uses_teacher else jax.jit(
      make_eval_step(networks, method, train.num_groups, diagnostics=False))

  def body():
    index_list, weights = None, None
    if method.reweight and config.distill.reweight == "upsample":
      index_list = upsampled_indices(len(train), error_set, int(config.distill.lambda_up))
    elif method.reweight:
      weights = example_weights(len(train), error_set, config.distill.lambda_up)
    select = "val/worst_group_acc" if config.distill.select == "val_worst_group" else None
    cached = None
    if config.distill.get("teacher_cache") and method.uses_teacher:
      cached = teacher_cache(ctx, teacher_model, teacher_vars, teacher_head)
    selected, summary = train_model(ctx, name, networks, method, variables, frozen, train,
                                    config.distill.optim, index_list=index_list, weights=weights,
                                    select_metric=select, eval_step=select_step,
                                    seed_offset=seed_offset, cached=cached)
    sums: dict = {}
    metrics = evaluate(ctx, eval_step, selected, frozen, sums_out=sums)
    record = {"metrics": metrics, "selection": summary["selection"], "history": summary["history"]}
    sensitivity = head_sensitivity(sums["val"], teacher_head)
    if sensitivity is not None:
      record["head_sensitivity"] = {"split": "val", **sensitivity}
    return selected, record

  variables = replicate(variables, ctx.mesh)
  _, record = run_stage(ctx, name, variables, body)
  entry = {"role": "student", "method": method.name, "metrics": record["metrics"],
           "selection": record["selection"]}
  if "head_sensitivity" in record:
    entry["head_sensitivity"] = record["head_sensitivity"]
  return entry


# ---------------------------------------------------------------------------
# The whole pipeline.
# ---------------------------------------------------------------------------

def setup_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Checks the config and workdir, builds the mesh and loads the data.

  Every check that can refuse the config runs before `config.json` is written, so a
  refused config leaves no record that would refuse the corrected one."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  check_workdir_writable(workdir, config.get("min_free_mb", 100))  # every process: shared disk?
  mesh = make_mesh(config.mesh.data, config.mesh.get("model", 1))
  for field, size in batch_sizes(config).items():
    if size % mesh.devices.size:
      raise ValueError(f"{field}={size} is not divisible by the {mesh.devices.size} devices of "
                       f"the mesh's data axis; use a multiple of {mesh.devices.size}")
  splits = load_splits(config.data)
  check_schedules(config, len(splits["train"]))  # a data set on disk: its size is known now
  check_workdir_config(config, workdir)
  ctx = Context(config, workdir, splits, mesh, MetricLogger(workdir),
                Preprocess.from_config(config.data))
  logging.info("mesh %s over %d devices; train group counts %s", dict(mesh.shape),
               mesh.devices.size, ctx.train_counts.tolist())
  return ctx


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage; writes results.json, report.md and groups.png; returns the results."""
  ctx = setup_context(config, workdir)
  workdir = ctx.workdir
  methods = [get_method(m) for m in parse_methods(config.distill.methods)]

  try:
    with StopSignals():  # SIGTERM/SIGINT: finish the step or stage in progress, then stop
      models = run_stages(ctx, methods)
  finally:  # flush TensorBoard events also when a stage is interrupted
    ctx.logger.close()
  results = {"config": config.to_dict(), "models": models}
  if distributed.is_primary():
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    write_report(results, workdir)
  distributed.sync("results")  # the other processes return once the files are there
  return results


def batch_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Every global batch size the run uses, by config field."""
  sizes = {"batch_size": config.batch_size}
  for name, optim in optimizers(config).items():
    if optim.get("batch_size"):
      sizes[f"{name}.batch_size"] = optim.batch_size
  return sizes


def optimizers(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The optimizer config of every training stage, by config field."""
  return {"pretrain.teacher": config.pretrain.teacher, "pretrain.student": config.pretrain.student,
          "teacher.optim": config.teacher.optim, "identification": config.identification,
          "distill.optim": config.distill.optim}


def run_stages(ctx: Context, methods: list[Method]) -> dict[str, dict]:
  """Teachers, identification and students in order; returns the `models` of results.json."""
  models, teacher_vars, distill_head = teachers(ctx)

  student_pre = pretrain(ctx, "student") if methods else None
  error_set = np.zeros(0, np.int64)
  if any(m.reweight for m in methods):
    error_set = np.asarray(identification(ctx, student_pre)["error_set"], np.int64)
  for method in methods:
    models[f"student_{method.name}"] = student(ctx, method, student_pre, teacher_vars,
                                               distill_head, error_set)
  return models


def parse_methods(methods: str) -> list[str]:
  return [m.strip() for m in str(methods).split(",") if m.strip()]
