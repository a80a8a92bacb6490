"""Teacher stages: pretraining, the ERM teacher, the debiased teachers (DFR, group DRO),
and what students read from a teacher (its cached outputs, its feature scale)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dett_jax import dfr, distributed, methods
from dett_jax.checkpoints import load_variables
from dett_jax.config_schema import TEXT_ARCHS
from dett_jax.data import pretraining_classes, pretraining_set
from dett_jax.methods.base import Models, Setup
from dett_jax.sharding import replicate
from dett_jax.stages.builders import (backbone, backbone_variables, compute_dtype, init_model,
                                      input_dtype, input_shape, load_init, with_new_head)
from dett_jax.stages.context import (Context, Training, evaluate, per_example, run_stage,
                                     train_model)
from dett_jax.teacher_cache import open_cache, write_cache
from dett_jax.training.steps import make_eval_step

Tree = Any


def selection(ctx: Context) -> str | None:
  """The validation metric `distill.select` selects by (None: the last epoch)."""
  return "val/worst_group_acc" if ctx.config.distill.select == "val_worst_group" else None


def _trained(ctx: Context, name: str, method_name: str, model, initial: Tree, split, optim,
             select: str | None = None) -> tuple[Tree, dict, methods.Method]:
  """`model` trained from `initial` with a classifier method (erm, gdro) in stage `name`."""
  method = methods.get(method_name)(Models(student=model), ctx.config)
  setup = Setup(teacher_head=None, group_counts=ctx.train_counts, input_shape=input_shape(ctx.config),
                input_dtype=input_dtype(ctx.config))
  eval_step = jax.jit(make_eval_step(Models(student=model), method, len(ctx.train_counts),
                                     diagnostics=False)) if select else None
  variables, summary = train_model(
      ctx, name, method, method.init(ctx.key(name, "init"), initial, setup), method.frozen(setup),
      Training(split, optim, (name,), select_metric=select, eval_step=eval_step))
  return variables, summary, method


def pretrain(ctx: Context, role: str) -> Tree:
  """Backbone of `role` ("teacher" or "student") trained on the unbiased pretraining task,
  or loaded from `<role>.init`, or (pretraining off) freshly initialised."""
  config = ctx.config
  model = backbone(config, role, pretraining_classes(config.data))
  initial = init_model(model, input_shape(config), ctx.key("pretrain", role, "init"),
                       input_dtype(config))
  if config[role].init:
    logging.info("%s: backbone from %s", role, config[role].init)
    return load_init(config, role, initial)
  if not config.pretrain.enabled:
    reference = ("a pretrained BERT / DistilBERT folder" if config[role].arch in TEXT_ARCHS
                 else "ImageNet weights")
    logging.warning("%s: no pretraining and no %s.init checkpoint; starting from random "
                    "weights (the reference setting starts from %s)", role, role, reference)
    return initial

  def body():
    data = pretraining_set(config.data, config.pretrain.size)
    variables, summary, _ = _trained(ctx, f"pretrain_{role}", "erm", model, initial, data,
                                     config.pretrain[role])
    return backbone_variables(variables), {"history": summary["history"]}

  variables, _ = run_stage(ctx, f"pretrain_{role}", initial, body)
  return variables


def teacher_eval_step(ctx: Context, model) -> Any:
  return jax.jit(make_eval_step(Models(student=None, teacher=model), None,
                                ctx.splits["train"].num_groups))


def teacher_frozen(variables: Tree, head: Tree) -> Tree:
  return {"teacher": variables, "teacher_head": head}


def head_of(variables: Tree, model) -> Tree:
  """The Dense head `{"kernel", "bias"}` in a backbone's variables (`params[model.head_name]`)."""
  return variables["params"][model.head_name]


def teacher_erm(ctx: Context, pretrained: Tree | None) -> tuple[Tree, dict]:
  """ERM teacher (fine-tuned from the pretrained backbone), or the user's checkpoint."""
  config = ctx.config
  model = backbone(config, "teacher", ctx.splits["train"].num_classes)
  head_key = ctx.key("teacher_erm", "head")
  template = (init_model(model, input_shape(config), head_key, input_dtype(config))
              if pretrained is None
              else with_new_head(pretrained, model, model.num_classes, head_key))

  def body():
    if config.teacher.checkpoint:
      variables = load_variables(config.teacher.checkpoint, replicate(template, ctx.mesh))
      summary = {"source": os.path.abspath(config.teacher.checkpoint)}
    else:
      variables, summary, _ = _trained(ctx, "teacher_erm", "erm", model, template,
                                       ctx.splits["train"], config.teacher.optim)
      variables = backbone_variables(variables)
    metrics = evaluate(ctx, teacher_eval_step(ctx, model), None,
                       teacher_frozen(variables, head_of(variables, model)))
    return variables, {"metrics": metrics, **summary}

  return run_stage(ctx, "teacher_erm", template, body)


def embeddings(ctx: Context, model, variables: Tree, split) -> np.ndarray:
  """Pooled penultimate features `[n, d]` of `split`."""
  return per_example(ctx, lambda v, x: model.apply(v, x, train=False)["features"], variables, split)


def teacher_dfr(ctx: Context, erm_variables: Tree) -> tuple[Tree, dict]:
  """DFR: the ERM teacher's backbone with a last layer refit on balanced validation data."""
  config = ctx.config
  model = backbone(config, "teacher", ctx.splits["train"].num_classes)
  template = jax.tree.map(jnp.zeros_like, head_of(erm_variables, model))

  def body():
    val = ctx.splits["val"]
    result = dfr.fit_dfr(embeddings(ctx, model, erm_variables, val), val.labels, val.groups,
                         num_classes=val.num_classes, c_grid=tuple(config.teacher.dfr_c_grid),
                         num_refits=config.teacher.dfr_num_refits, seed=ctx.seed("teacher_dfr"))
    head = replicate(dfr.dense_params(result), ctx.mesh)
    metrics = evaluate(ctx, teacher_eval_step(ctx, model), None, teacher_frozen(erm_variables, head))
    return head, {"metrics": metrics, "selection": {
        "metric": "dfr/half_val_worst_group_acc", "best_c": result.best_c,
        "c_scores": {str(k): v for k, v in result.c_scores.items()}}}

  return run_stage(ctx, "teacher_dfr", template, body)


def teacher_gdro(ctx: Context, pretrained: Tree) -> tuple[Tree, dict]:
  """Group-DRO teacher (Sagawa et al. 2020): the teacher architecture fine-tuned from the
  pretrained backbone with the `gdro` method (`config.gdro`, `teacher.optim`), selected
  like the students (`distill.select`). Its backbone and head are both its own."""
  config = ctx.config
  model = backbone(config, "teacher", ctx.splits["train"].num_classes)
  template = with_new_head(pretrained, model, model.num_classes, ctx.key("teacher_gdro", "head"))

  def body():
    variables, summary, _ = _trained(ctx, "teacher_gdro", "gdro", model, template,
                                     ctx.splits["train"], config.teacher.optim, selection(ctx))
    q = np.asarray(distributed.to_host(variables["collections"]["gdro"]["q"]), np.float64)
    variables = backbone_variables(variables)
    metrics = evaluate(ctx, teacher_eval_step(ctx, model), None,
                       teacher_frozen(variables, head_of(variables, model)))
    return variables, {"metrics": metrics, "selection": summary["selection"],
                       "group_weights": q.tolist(), "history": summary["history"]}

  return run_stage(ctx, "teacher_gdro", template, body)


def teachers(ctx: Context) -> tuple[dict[str, dict], Tree, Tree]:
  """The teacher stages: ERM, then the debiased teachers of `teacher.debias` (DFR: the
  ERM backbone with a refit head; group DRO: its own backbone and head). Returns (their
  `models` entries of results.json, the distilled teacher's variables, its head), the
  distilled teacher being `distill.teacher`'s."""
  config = ctx.config
  debias = methods.parse_debias(config.teacher.debias)
  teacher_pre = None if config.teacher.checkpoint else pretrain(ctx, "teacher")
  erm_vars, erm_record = teacher_erm(ctx, teacher_pre)
  models = {"teacher_erm": {"role": "teacher", "method": "erm", "metrics": erm_record["metrics"]}}
  head_name = backbone(config, "teacher", ctx.splits["train"].num_classes).head_name
  distilled = {"erm": (erm_vars, erm_vars["params"][head_name])}
  if "dfr" in debias:
    head, record = teacher_dfr(ctx, erm_vars)
    models["teacher_dfr"] = {"role": "teacher", "method": "dfr", "metrics": record["metrics"],
                             "selection": record["selection"]}
    distilled["dfr"] = (erm_vars, head)
  if "gdro" in debias:
    gdro_vars, record = teacher_gdro(ctx, teacher_pre)
    models["teacher_gdro"] = {"role": "teacher", "method": "gdro", "metrics": record["metrics"],
                              "selection": record["selection"]}
    distilled["gdro"] = (gdro_vars, gdro_vars["params"][head_name])
  teacher_vars, head = distilled[config.distill.teacher]
  return models, teacher_vars, head


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
    features = np.asarray(model.pool(jnp.asarray(fmap, jnp.float32)))
    logits = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    if distributed.is_primary():
      write_cache(directory, {"teacher_feature_map": fmap, "teacher_logits": logits})
    distributed.sync("teacher_cache")
    cached = open_cache(directory)
    logging.info("teacher cache: %s feature maps %s written to %s",
                 len(fmap), fmap.shape[1:], directory)
  return cached


def teacher_feature_scale(ctx: Context, model, variables: Tree) -> jax.Array:
  """1 / the per-channel standard deviation `[c]` of the teacher's feature maps over the
  training split (every position, no augmentation): `dett_std`'s scale. Computed once
  per teacher and run (kept on `ctx`)."""
  key = ("feature_scale", id(variables))
  if key not in ctx.memo:
    def moments(v, x):
      fmap = model.apply(v, x, train=False)["feature_map"].astype(jnp.float32)
      return jnp.stack([model.pool(fmap), model.pool(jnp.square(fmap))], 1)
    m = per_example(ctx, moments, variables, ctx.splits["train"]).astype(np.float64).mean(0)
    std = np.sqrt(np.maximum(m[1] - m[0] ** 2, 0.0))
    ctx.memo[key] = jnp.asarray(1.0 / np.maximum(std, 1e-6 * max(float(std.max()), 1e-12)),
                                jnp.float32)
  return ctx.memo[key]
