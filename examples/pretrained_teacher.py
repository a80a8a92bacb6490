"""DeTT from a teacher checkpoint on disk: load, debias the head (DFR), transplant, distill.

Only the public `dett_jax` API is used (plus jax, optax and numpy).

  python examples/pretrained_teacher.py                  # writes a teacher first, then loads it
  python examples/pretrained_teacher.py --steps 4        # quick smoke run
  python examples/pretrained_teacher.py --teacher runs/demo/teacher_erm/final \\
      [--head runs/demo/teacher_dfr/final]               # a teacher saved by train.py

`--teacher` is an Orbax checkpoint of `dett_jax.create_resnet` variables
(`{"params", "batch_stats"}`, as train.py saves them, or as `dett_jax.save_variables`
writes them; a torchvision ResNet converts with `dett_jax.torchvision_to_flax`). The
architecture is read from the checkpoint. Without `--teacher` the example trains an ERM
teacher briefly and saves it to a temporary directory first.

Then: the teacher's head is refit by DFR on the validation split (unless `--head` gives a
debiased head), an identification model finds the error set, and the student is trained
by DeTT with the ready-made guarded step `make_dett_step` (over `dett_loss`) and
`dett_jax.TrainState`. Here the transplanted head lives *inside* the student's parameter
tree (`transplant_head`) and the optimizer freezes it (`freeze`); the batches are the
library's (`epoch_batches`, `evaluate_groups`). Group metrics of the teacher (ERM and DFR
heads) and of the student are printed; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dett_jax

SETTINGS: dict[str, Any] = {
    "seed": 0,
    "batch_size": 64,
    # faint=0: every object is visible, so that networks trained from scratch for a few
    # seconds can pick up the shapes.
    "data": {"name": "synthetic", "image_size": 32, "train_size": 1000, "val_size": 400,
             "test_size": 1000, "seed": 0, "faint": 0.0},
    "teacher": {"depth": 10, "width": 0.125, "stem": "small", "steps": 200,
                "learning_rate": 3e-3},   # only when no --teacher is given
    "identification": {"steps": 30, "learning_rate": 3e-3},
    "student": {"depth": 10, "width": 0.0625, "stem": "small"},
    "distill": {"lambda_up": 20, "projector": "simkd", "epochs": 4, "learning_rate": 5e-3,
                "weight_decay": 1e-4},
}


def init_key(seed: int) -> jax.Array:
  """A key for initialising parameters ("rbg": compiles several times faster on CPU)."""
  return jax.random.key(seed, impl="rbg")


def resnet_architecture(params: dict[str, Any]) -> dict[str, Any]:
  """(depth, width, stem) of `dett_jax.create_resnet` parameters, read from their shapes."""
  blocks = [name for name in params if name.startswith(("BasicBlock_", "BottleneckBlock_"))]
  bottleneck = blocks[0].startswith("Bottleneck")
  depth = {4: 10, 8: 18, 16: 50 if bottleneck else 34}[len(blocks)]
  kernel = np.shape(params["conv_init"]["kernel"])       # [kh, kw, 3, 64 * width]
  return {"depth": depth, "width": kernel[-1] / 64, "stem": "small" if kernel[0] == 3 else "imagenet"}


# ---------------------------------------------------------------------------
# ERM (to write a teacher when none is given, and the identification model).
# ---------------------------------------------------------------------------

def train_erm(model: Any, variables: dict[str, Any], split: dett_jax.Split,
              preprocess: dett_jax.Preprocess, steps: int, learning_rate: float,
              batch_size: int, seed: int) -> dict[str, Any]:
  """Cross-entropy training of a Linen classifier for `steps` steps."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def erm_step(params, batch_stats, opt_state, batch):
    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                 train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()
      return loss, updates["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  step, epoch = 0, 0
  while step < steps:
    for batch in dett_jax.epoch_batches(split, batch_size=batch_size, epoch=epoch, seed=seed,
                                        preprocess=preprocess):
      params, batch_stats, opt_state = erm_step(params, batch_stats, opt_state,
                                                {"image": batch["image"], "label": batch["label"]})
      step += 1
      if step == steps:
        break
    epoch += 1
  return {"params": params, "batch_stats": batch_stats}


def write_teacher(splits: dict[str, dett_jax.Split], preprocess: dett_jax.Preprocess,
                  steps: int) -> str:
  """Trains an ERM teacher briefly and saves it; returns the checkpoint directory."""
  arch, train, size = SETTINGS["teacher"], splits["train"], SETTINGS["data"]["image_size"]
  teacher = dett_jax.create_resnet(arch["depth"], train.num_classes, arch["width"], arch["stem"])
  variables = jax.jit(teacher.init)(init_key(SETTINGS["seed"] + 1), jnp.zeros((1, size, size, 3)))
  variables = train_erm(teacher, variables, train, preprocess, steps, arch["learning_rate"],
                        SETTINGS["batch_size"], SETTINGS["seed"] + 3)
  path = os.path.join(tempfile.mkdtemp(prefix="dett_teacher_"), "teacher")
  dett_jax.save_variables(path, variables)
  print(f"trained an ERM teacher for {steps} steps and saved it to {path}")
  return path


# ---------------------------------------------------------------------------
# The example.
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", default="", help="Orbax checkpoint of the teacher's "
                      "create_resnet variables (e.g. a train.py run's teacher_erm/final)")
  parser.add_argument("--head", default="", help="Orbax checkpoint of a debiased Dense head "
                      "(e.g. teacher_dfr/final); default: DFR here")
  parser.add_argument("--steps", type=int, default=0, help="train only this many steps (quick mode)")
  args = parser.parse_args(argv)
  start = time.time()
  limit = lambda n: min(n, args.steps or n)
  seed, batch_size = SETTINGS["seed"], SETTINGS["batch_size"]
  splits = dett_jax.load_splits(SETTINGS["data"])
  train, val = splits["train"], splits["val"]
  preprocess = dett_jax.Preprocess.from_config(SETTINGS["data"])
  train_counts = train.group_counts()
  size = SETTINGS["data"]["image_size"]
  images = jnp.zeros((1, size, size, 3))

  # 1. The teacher, from disk.
  teacher_dir = args.teacher or write_teacher(splits, preprocess, limit(SETTINGS["teacher"]["steps"]))
  teacher_vars = dett_jax.load_variables(teacher_dir)           # numpy arrays, any device layout
  arch = resnet_architecture(teacher_vars["params"])
  teacher = dett_jax.create_resnet(arch["depth"], train.num_classes, arch["width"], arch["stem"])
  teacher_vars = dett_jax.load_variables(                        # checked against the model
      teacher_dir, jax.eval_shape(teacher.init, init_key(0), images))
  teacher_apply = jax.jit(lambda x: teacher.apply(teacher_vars, x, train=False))
  print(f"teacher: ResNet-{arch['depth']} width {arch['width']:g} ({arch['stem']} stem) from "
        f"{teacher_dir}")

  # 2. A debiased head: given, or DFR on the validation split's embeddings.
  if args.head:
    head = dett_jax.load_variables(args.head)
  else:
    features = dett_jax.split_outputs(lambda x: teacher_apply(x)["features"], val,
                                      preprocess=preprocess)
    dfr = dett_jax.fit_dfr(features, val.labels, val.groups, num_classes=val.num_classes,
                           num_refits=4, seed=seed)
    head = dett_jax.dense_params(dfr)
  teacher_logits = lambda head: jax.jit(
      lambda x: dett_jax.dense_apply(head, teacher_apply(x)["features"]))
  evaluate = lambda logits_fn, split: dett_jax.evaluate_groups(
      logits_fn, splits[split], train_counts, name=split, preprocess=preprocess)
  teacher_erm = evaluate(teacher_logits(dett_jax.read_head(teacher_vars["params"])), "test")
  teacher_debiased = evaluate(teacher_logits(head), "test")

  # 3. The error set: the training mistakes of a briefly trained ERM model (the
  #    student's architecture with a head).
  s_arch = SETTINGS["student"]
  id_model = dett_jax.create_resnet(s_arch["depth"], train.num_classes, s_arch["width"], s_arch["stem"])
  initial = jax.jit(id_model.init)(init_key(seed + 2), images)
  id_vars = train_erm(id_model, initial, train, preprocess, limit(SETTINGS["identification"]["steps"]),
                      SETTINGS["identification"]["learning_rate"], batch_size, seed + 4)
  id_logits = jax.jit(lambda x: id_model.apply(id_vars, x, train=False)["logits"])
  error_set = dett_jax.find_error_set(
      dett_jax.split_outputs(id_logits, train, preprocess=preprocess), train.labels)

  # 4. DeTT, with the head transplanted into the single parameter tree and frozen there.
  settings = SETTINGS["distill"]
  student = dett_jax.create_resnet(s_arch["depth"], None, s_arch["width"], s_arch["stem"])
  student_vars = {"params": {k: v for k, v in initial["params"].items() if k != "head"},
                  "batch_stats": initial["batch_stats"]}
  student_map = jax.eval_shape(lambda v: student.apply(v, images)["feature_map"], student_vars)
  projector = dett_jax.Projector(settings["projector"], int(np.shape(head["kernel"])[0]))
  projector_vars = jax.jit(projector.init)(init_key(seed + 5), jnp.zeros(student_map.shape))
  params = dett_jax.transplant_head({"student": student_vars["params"],
                                     "projector": projector_vars["params"]}, head)
  collections = {"student": {"batch_stats": student_vars["batch_stats"]},
                 "projector": {"batch_stats": projector_vars["batch_stats"]}}

  def student_fn(params, collections, images, train, rng):
    """The student's feature map and its new BatchNorm statistics."""
    variables = {"params": params, **collections}
    if not train:
      return student.apply(variables, images, train=False)["feature_map"], collections
    out, collections = student.apply(variables, images, train=True, mutable=["batch_stats"])
    return out["feature_map"], collections

  epoch_batches = lambda epoch: dett_jax.epoch_batches(
      train, batch_size=batch_size, epoch=epoch, seed=seed + 10, error_set=error_set,
      lambda_up=int(settings["lambda_up"]), preprocess=preprocess)
  steps_per_epoch = len(epoch_batches(0))
  total_steps = args.steps or settings["epochs"] * steps_per_epoch
  tx = dett_jax.freeze(optax.adamw(optax.cosine_decay_schedule(settings["learning_rate"], total_steps),
                                   weight_decay=settings["weight_decay"]), ["head"])
  step = jax.jit(dett_jax.make_dett_step(
      student_fn, tx, projector=projector,
      teacher_fn=lambda v, x: teacher.apply(v, x, train=False)["feature_map"]))
  predict = jax.jit(dett_jax.make_dett_predict(student_fn, projector))
  state = dett_jax.TrainState.create(params, collections, tx)
  frozen = {"teacher": teacher_vars}          # no "head": the step reads params["head"]
  best = None
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    for batch in epoch_batches(epoch):
      state, metrics = step(state, {"image": batch["image"], "label": batch["label"]}, frozen)
      if int(state.step) == total_steps:
        break
    val_metrics = evaluate(lambda x: predict(state.params, state.collections, x, {}), "val")
    print(f"epoch {epoch + 1}: step {int(state.step)}, feature loss {float(metrics['loss']):.4f}, "
          f"val worst group {val_metrics['val/worst_group_acc']:.3f}", flush=True)
    if best is None or val_metrics["val/worst_group_acc"] > best[0]["val/worst_group_acc"]:
      best = (val_metrics, epoch + 1, jax.tree.map(jnp.copy, (state.params, state.collections)))
  val_metrics, selected_epoch, (params, collections) = best
  assert np.array_equal(np.asarray(params["head"]["kernel"]), np.asarray(head["kernel"]))  # frozen
  test = evaluate(lambda x: predict(params, collections, x, {}), "test")
  results = {**val_metrics, **test,
             "teacher_erm/test/worst_group_acc": teacher_erm["test/worst_group_acc"],
             "teacher_erm/test/avg_acc": teacher_erm["test/avg_acc"],
             "teacher/test/worst_group_acc": teacher_debiased["test/worst_group_acc"],
             "teacher/test/avg_acc": teacher_debiased["test/avg_acc"],
             "selected_epoch": selected_epoch, "steps": int(state.step),
             "error_set_size": int(len(error_set)), "seconds": round(time.time() - start, 1)}
  for key in sorted(k for k in results if "test/" in k):
    print(f"{key:36s} {results[key]:.4f}")
  print(json.dumps({"example": "pretrained_teacher", **results}))
  return results


if __name__ == "__main__":
  main()
