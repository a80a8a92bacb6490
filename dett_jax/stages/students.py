"""Student stages: identification (the error set) and one student per method."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dett_jax import distributed, methods
from dett_jax.data.pipeline import example_weights, upsampled_indices
from dett_jax.evaluation import head_sensitivity
from dett_jax.io import write_json_atomic
from dett_jax.methods.base import Method, Models, Setup
from dett_jax.models.backend import Backend
from dett_jax.models.projector import Projector
from dett_jax.sharding import replicate
from dett_jax.stages.builders import (backbone, backbone_variables, backend, compute_dtype,
                                      feature_width, input_dtype, input_shape, with_new_head)
from dett_jax.stages.context import Context, Training, evaluate, per_example, run_stage, train_model
from dett_jax.stages.teachers import selection, teacher_cache, teacher_feature_scale
from dett_jax.training.steps import make_eval_step

Tree = Any


def identification(ctx: Context, pretrained_student: Tree, epochs: int | None = None) -> dict:
  """ERM model of the student's architecture trained T_id epochs (`epochs`, default
  `identification.epochs`); its training errors. Another T_id is its own stage,
  `identification_T<epochs>` (sweeps), with the same random streams."""
  config, train = ctx.config, ctx.splits["train"]
  optim, stage = config.identification, "identification"
  if epochs is not None and epochs != optim.epochs:
    optim = ml_collections.ConfigDict({**optim.to_dict(), "epochs": int(epochs)})
    stage = f"identification_T{int(epochs)}"
  model = backbone(config, "student", train.num_classes)
  erm = methods.get("erm")(Models(student=model), config)
  initial = with_new_head(pretrained_student, model, model.num_classes,
                          ctx.key("identification", "head"))

  def body():
    variables, _ = train_model(ctx, stage, erm, erm.init(None, initial, None), {},
                               Training(train, optim, ("identification",)))
    pred = per_example(ctx, lambda v, x: jnp.argmax(model.apply(v, x, train=False)["logits"], -1),
                       backbone_variables(variables), train)
    error_set = np.flatnonzero(pred != train.labels)
    record = {
        "error_set": error_set.tolist(), "size": int(len(error_set)), "train_size": len(train),
        "settings": {"T_id": optim.epochs, "arch": config.student.arch,
                     "depth": config.student.depth, "width": config.student.width,
                     "seed": config.seed,
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


def student_models(config: ml_collections.ConfigDict, method_cls: type[Method], num_classes: int,
                   policy: Backend) -> Models:
  """The student (with its own head when the method keeps one), its projector and the
  teacher, as `method_cls` trains them under `config` and the backend `policy`."""
  teacher = backbone(config, "teacher", num_classes, policy)
  if method_cls.student_head:
    return Models(student=backbone(config, "student", num_classes, policy), teacher=teacher)
  projector = Projector(config.distill.projector, feature_width(config, "teacher"),
                        config.distill.projector_factor,
                        dtype=compute_dtype(config), backend=policy)
  return Models(student=backbone(config, "student", None, policy), projector=projector,
                teacher=teacher)


def student_setup(ctx: Context, method_cls: type[Method], config: ml_collections.ConfigDict,
                  pretrained_student: Tree, teacher_vars: Tree, teacher_head: Tree,
                  key: jax.Array, policy: Backend | None = None) -> tuple[Method, Tree, Tree]:
  """(the method, its initial `{"params", "collections"}`, the frozen tree) of a student
  under `config`; `key` initialises what is not pretrained (a head, the projector)."""
  train = ctx.splits["train"]
  models = student_models(config, method_cls, train.num_classes, policy or backend(config))
  method = method_cls(models, config)
  setup = Setup(teacher_head=teacher_head, group_counts=ctx.train_counts,
                input_shape=input_shape(config), input_dtype=input_dtype(config),
                feature_scale=lambda: teacher_feature_scale(ctx, models.teacher, teacher_vars))
  head_key, init_key = jax.random.split(key)
  classes = train.num_classes if method_cls.student_head else None
  student = with_new_head(pretrained_student, models.student, classes, head_key)
  variables = method.init(init_key, student, setup)
  frozen = {"teacher": teacher_vars, "teacher_head": teacher_head, **method.frozen(setup)}
  return method, variables, frozen


def reweighting(ctx: Context, method: Method, error_set: np.ndarray, lambda_up: float
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(index list, example weights) of a method's training data: the error set upsampled
  or upweighted by `lambda_up` (`distill.reweight`) when the method reweights."""
  n = len(ctx.splits["train"])
  if not method.reweight:
    return None, None
  if ctx.config.distill.reweight == "upsample":
    return upsampled_indices(n, error_set, int(lambda_up)), None
  return None, example_weights(n, error_set, lambda_up)


def student(ctx: Context, method_name: str, pretrained_student: Tree, teacher_vars: Tree,
            teacher_head: Tree, error_set: np.ndarray) -> dict:
  """Trains and evaluates the student of `method_name`; returns its results entry."""
  config, train = ctx.config, ctx.splits["train"]
  name = f"student_{method_name}"
  method, variables, frozen = student_setup(ctx, methods.get(method_name), config,
                                            pretrained_student, teacher_vars, teacher_head,
                                            ctx.key(name, "init"))
  eval_step = jax.jit(make_eval_step(method.models, method, train.num_groups))
  # Selection evaluates val each epoch; with a teacher, its diagnostics (agreement, feature
  # and logit error) go to metrics.jsonl and TensorBoard too.
  select_step = eval_step if method.needs_teacher else jax.jit(
      make_eval_step(method.models, method, train.num_groups, diagnostics=False))

  def body():
    index_list, weights = reweighting(ctx, method, error_set, config.distill.lambda_up)
    cached = None
    if config.distill.teacher_cache and method.needs_teacher:
      cached = teacher_cache(ctx, method.models.teacher, teacher_vars, teacher_head)
    selected, summary = train_model(ctx, name, method, variables, frozen, Training(
        train, config.distill.optim, (name,), index_list, weights, selection(ctx), select_step,
        cached))
    sums: dict = {}
    metrics = evaluate(ctx, eval_step, selected, frozen, sums_out=sums)
    record = {"metrics": metrics, "selection": summary["selection"], "history": summary["history"]}
    sensitivity = head_sensitivity(sums["val"], teacher_head)
    if sensitivity is not None:
      record["head_sensitivity"] = {"split": "val", **sensitivity}
    return selected, record

  _, record = run_stage(ctx, name, replicate(variables, ctx.mesh), body)
  entry = {"role": "student", "method": method.name, "metrics": record["metrics"],
           "selection": record["selection"]}
  if "head_sensitivity" in record:
    entry["head_sensitivity"] = record["head_sensitivity"]
  return entry
