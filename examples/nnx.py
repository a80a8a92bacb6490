"""DeTT as a loss in a Flax NNX loop (`nnx.Optimizer`), NNX student, projector and teacher.

Only the public `dett_jax` API is used (plus jax, flax, optax and numpy). The models are
plain `nnx.Module`s trained in place by `nnx.Optimizer` under `nnx.jit`; the DeTT step
differentiates `dett_jax.dett_loss` with `jax.value_and_grad`, seeing the student (an NNX
ResNet with a `dett_jax.NNXProjector` on top) as a pure function of its state through
`nnx.merge`.

  python examples/nnx.py                    # everything from scratch (< 1 min on a CPU)
  python examples/nnx.py --steps 4          # quick smoke run
  python examples/nnx.py --run runs/demo    # the teacher, pretrained student and error set
                                            # of a train.py run, loaded into NNX modules

Without `--run`: an ERM model of the student's architecture, trained briefly, gives the
error set (its training mistakes); a JTT teacher (ERM on the upsampled training set) is
the debiased teacher. With `--run DIR` (a finished `python train.py --workdir DIR` run),
the teacher (`teacher_erm` + the `teacher_dfr` head, or `teacher_gdro` with
distill.teacher=gdro), the pretrained student backbone and the error set come from that
run, and data, seed and distillation settings from its `config.json`; the loop draws
train.py's batches and initial projector. The NNX ResNet below computes exactly what
`dett_jax.create_resnet` computes, and its attribute names follow that model's parameter
names (as `NNXProjector`'s follow `Projector`'s), so train.py's checkpoints load by name.

Then DeTT: the student (no head of its own) plus the projector learn to match the
teacher's last-stage feature map on the upsampled training set; the student predicts
with the teacher's head, transplanted and frozen. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dett_jax

# The built-in benchmark and the settings used without --run (field names as in a
# train.py config.json).
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "batch_size": 64,
    "augment": True,
    # faint=0: every object is visible, so that networks trained from scratch for a few
    # seconds can pick up the shapes (train.py's demo pretrains them instead).
    "data": {"name": "synthetic", "image_size": 32, "train_size": 1000, "val_size": 400,
             "test_size": 1000, "seed": 0, "faint": 0.0},
    "identification": {"steps": 30, "learning_rate": 3e-3},
    "teacher": {"depth": 10, "width": 0.125, "stem": "small", "steps": 200,
                "learning_rate": 3e-3},
    "student": {"depth": 10, "width": 0.0625, "stem": "small"},
    "distill": {"lambda_up": 20, "projector": "simkd", "projector_factor": 2, "match": "map",
                "select": "val_worst_group",
                "optim": {"epochs": 6, "learning_rate": 5e-3, "weight_decay": 1e-4}},
}
PAD = ((1, 1), (1, 1))  # symmetric padding of 3x3 windows (as torchvision and dett_jax pad)


# ---------------------------------------------------------------------------
# An NNX ResNet (basic blocks, small-image stem).
# ---------------------------------------------------------------------------

class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with a residual connection (a strided 1x1 shortcut when needed)."""

  def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)
    norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.Conv_0 = conv(in_channels, channels, (3, 3), strides=stride, padding=PAD)
    self.BatchNorm_0 = norm(channels)
    self.Conv_1 = conv(channels, channels, (3, 3), padding=PAD)
    self.BatchNorm_1 = norm(channels, scale_init=nnx.initializers.zeros)
    self.shortcut = stride != 1 or in_channels != channels
    if self.shortcut:
      self.conv_proj = conv(in_channels, channels, (1, 1), strides=stride)
      self.norm_proj = norm(channels)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nnx.relu(self.BatchNorm_0(self.Conv_0(x), use_running_average=not train))
    y = self.BatchNorm_1(self.Conv_1(y), use_running_average=not train)
    if self.shortcut:
      x = self.norm_proj(self.conv_proj(x), use_running_average=not train)
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """ResNet-10/18; returns `feature_map` `[b, h/8, w/8, c]`, `features` `[b, c]` and,
  with a head, `logits` `[b, num_classes]`."""

  def __init__(self, depth: int, num_classes: int | None, width: float, *, rngs: nnx.Rngs):
    stages = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}[depth]
    base = max(1, int(round(64 * width)))
    self.conv_init = nnx.Conv(3, base, (3, 3), padding=PAD, use_bias=False, rngs=rngs)
    self.bn_init = nnx.BatchNorm(base, momentum=0.9, epsilon=1e-5, rngs=rngs)
    channels, self.num_blocks = base, 0
    for i, count in enumerate(stages):
      for j in range(count):
        block = BasicBlock(channels, base * 2**i, 2 if i > 0 and j == 0 else 1, rngs=rngs)
        setattr(self, f"BasicBlock_{self.num_blocks}", block)
        channels, self.num_blocks = base * 2**i, self.num_blocks + 1
    self.num_features = channels
    self.head = nnx.Linear(channels, num_classes, rngs=rngs) if num_classes else None

  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = nnx.relu(self.bn_init(self.conv_init(x), use_running_average=not train))
    for k in range(self.num_blocks):
      x = getattr(self, f"BasicBlock_{k}")(x, train)
    out = {"feature_map": x, "features": jnp.mean(x, axis=(1, 2))}
    if self.head is not None:
      out["logits"] = self.head(out["features"])
    return out


def create_model(arch: dict[str, Any], num_classes: int | None, seed: int) -> ResNet:
  """A freshly initialised ResNet, built in one compiled program (faster than op by op);
  the "rbg" generator compiles several times faster than JAX's default on CPU."""
  if arch.get("stem", "small") != "small":
    raise ValueError("this example's NNX ResNet has the small-image stem only")
  key = jax.random.key(seed, impl="rbg")
  return nnx.jit(lambda: ResNet(arch["depth"], num_classes, arch["width"], rngs=nnx.Rngs(key)))()


def load_linen_variables(model: nnx.Module, variables: dict[str, Any]) -> nnx.Module:
  """Copies Linen variables (`{"params", "batch_stats"}` of `dett_jax.create_resnet` or
  `dett_jax.Projector`, e.g. saved by train.py) into `model`, by name."""

  def merge(a: dict, b: dict) -> dict:  # params and batch_stats -> one tree per module
    out = dict(a)
    for key, value in b.items():
      out[key] = merge(out[key], value) if key in out else value
    return out

  state = nnx.state(model)
  tree = jax.device_put(merge(variables.get("params", {}), variables.get("batch_stats", {})))
  if len(jax.tree.leaves(tree)) != len(jax.tree.leaves(state)):
    raise ValueError(f"the variables have {len(jax.tree.leaves(tree))} arrays, the model "
                     f"{len(jax.tree.leaves(state))}: another architecture?")
  nnx.replace_by_pure_dict(state, tree)   # names must match (ValueError otherwise)
  nnx.update(model, state)
  return model


def cosine_schedule(peak: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup from 0 (none: one step at the peak), then cosine decay to 0: train.py's."""
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else peak, peak,
                                            max(warmup_steps, 1), total_steps)


# ---------------------------------------------------------------------------
# Teacher and error set: from a train.py run, or made here (idiomatic NNX training).
# ---------------------------------------------------------------------------

def from_run(run_dir: str) -> dict[str, Any]:
  """The config, teacher, (DFR) head, pretrained student and error set of a train.py run."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  if config["distill"].get("reweight", "upsample") != "upsample":
    raise SystemExit(f"{run_dir} reweights by loss weights; this example upsamples (train.py's "
                     "default distill.reweight=upsample)")
  if config["distill"]["optim"].get("optimizer", "adamw") != "adamw":
    raise SystemExit(f"{run_dir} distils with {config['distill']['optim']['optimizer']}; this "
                     "example's optimizer is AdamW (train.py's default)")
  with open(os.path.join(run_dir, "identification", "error_set.json")) as f:
    error_set = np.asarray(json.load(f)["error_set"], np.int64)
  num_classes = config["data"].get("num_classes", 2)
  # The distilled teacher (distill.teacher): DFR's head on the ERM backbone, or a group-DRO
  # teacher's own backbone and head, or the ERM teacher.
  stage = "teacher_gdro" if config["distill"]["teacher"] == "gdro" else "teacher_erm"
  teacher_vars = dett_jax.load_variables(os.path.join(run_dir, stage, "final"))
  teacher = load_linen_variables(
      nnx.eval_shape(lambda: ResNet(config["teacher"]["depth"], num_classes,
                                    config["teacher"]["width"], rngs=nnx.Rngs(0))), teacher_vars)
  head = teacher_vars["params"]["head"]
  if config["distill"]["teacher"] == "dfr":
    head = dett_jax.load_variables(os.path.join(run_dir, "teacher_dfr", "final"))
  head = jax.device_put(head)
  student_vars = dett_jax.load_variables(os.path.join(run_dir, "pretrain_student", "final"))
  student_vars["params"].pop("head")  # the pretraining task's head; DeTT uses the teacher's
  student = load_linen_variables(
      nnx.eval_shape(lambda: ResNet(config["student"]["depth"], None, config["student"]["width"],
                                    rngs=nnx.Rngs(0))), student_vars)
  return {"config": config, "teacher": teacher, "head": head, "student": student,
          "error_set": error_set, "from_run": True}


def train_erm(model: ResNet, split: dett_jax.Split, preprocess: dett_jax.Preprocess,
              config: dict[str, Any], steps: int, learning_rate: float, seed: int,
              error_set: np.ndarray | None = None, lambda_up: int = 1) -> ResNet:
  """Cross-entropy training of `model` in place (`nnx.Optimizer`); with `error_set`, JTT."""
  tx = optax.adamw(cosine_schedule(learning_rate, steps), weight_decay=1e-4)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def erm_step(model: ResNet, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    def loss_fn(model):
      logits = model(batch["image"], train=True)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  step, epoch = 0, 0
  while step < steps:
    for batch in dett_jax.epoch_batches(split, batch_size=config["batch_size"], epoch=epoch,
                                        seed=seed, error_set=error_set, lambda_up=lambda_up,
                                        preprocess=preprocess, augment=config["augment"]):
      erm_step(model, optimizer, {"image": batch["image"], "label": batch["label"]})
      step += 1
      if step == steps:
        break
    epoch += 1
  return model


def make_teacher(config: dict[str, Any], splits: dict[str, dett_jax.Split],
                 preprocess: dett_jax.Preprocess, max_steps: int | None) -> dict[str, Any]:
  """The error set (a briefly trained ERM student) and a debiased (JTT) teacher."""
  train, seed = splits["train"], config["seed"]
  steps = lambda n: min(n, max_steps or n)
  # 1. Identification: ERM of the student's architecture, briefly; its training errors.
  id_model = create_model(config["student"], train.num_classes, seed + 2)
  # The student: the identification model's architecture and initial backbone, no head.
  student = nnx.clone(id_model)
  student.head = None
  id_model = train_erm(id_model, train, preprocess, config, steps(config["identification"]["steps"]),
                       config["identification"]["learning_rate"], seed + 4)
  logits = nnx.jit(lambda model, images: model(images, train=False)["logits"])
  error_set = dett_jax.find_error_set(
      dett_jax.split_outputs(lambda x: logits(id_model, x), train, preprocess=preprocess),
      train.labels)
  # 2. A debiased teacher without group labels: JTT (ERM on the upsampled training set).
  arch = config["teacher"]
  teacher = train_erm(create_model(arch, train.num_classes, seed + 1), train, preprocess, config,
                      steps(arch["steps"]), arch["learning_rate"], seed + 3, error_set,
                      int(config["distill"]["lambda_up"]))
  print(f"error set: {len(error_set)} of {len(train)} training examples; teacher trained "
        f"{steps(arch['steps'])} steps (JTT)")
  head = {"kernel": teacher.head.kernel[...], "bias": teacher.head.bias[...]}
  return {"teacher": teacher, "head": head, "error_set": error_set, "from_run": False,
          "student": student}


# ---------------------------------------------------------------------------
# DeTT: dett_loss under jax.value_and_grad, nnx.Optimizer.update.
# ---------------------------------------------------------------------------

class Student(nnx.Module):
  """The student backbone and the projector: images -> the student's map in the teacher's
  feature space (what DeTT matches to the teacher's map)."""

  def __init__(self, backbone: ResNet, projector: dett_jax.NNXProjector):
    self.backbone, self.projector = backbone, projector

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.projector(self.backbone(x, train)["feature_map"], train)


def distill(config: dict[str, Any], splits: dict[str, dett_jax.Split],
            preprocess: dett_jax.Preprocess, inputs: dict[str, Any],
            max_steps: int | None) -> dict[str, Any]:
  """Trains the student by DeTT; returns the selected model's val and test metrics."""
  train, settings = splits["train"], config["distill"]
  optim, seed = settings["optim"], config["seed"]
  batch_size = optim.get("batch_size") or config["batch_size"]
  augment = config["augment"] if optim.get("augment") is None else optim["augment"]
  teacher, head = inputs["teacher"], inputs["head"]
  kind, factor = settings["projector"], settings["projector_factor"]
  in_channels, out_channels = inputs["student"].num_features, teacher.num_features
  make_projector = lambda rngs: dett_jax.NNXProjector(kind, in_channels, out_channels, factor,
                                                      rngs=rngs)
  if inputs["from_run"]:   # train.py's data order and initial projector for its dett student
    data_seed = dett_jax.rng.seed(config["seed"], "student_dett", "data")
    key = jax.random.split(jax.random.key(dett_jax.rng.seed(config["seed"], "student_dett", "init")))[1]
    linen_init = jax.jit(dett_jax.Projector(kind, out_channels, factor).init)
    projector = load_linen_variables(nnx.eval_shape(lambda: make_projector(nnx.Rngs(0))),
                                     linen_init(key, jnp.zeros((1, 1, 1, in_channels))))
  else:
    data_seed, key = seed + 10, jax.random.key(seed + 5, impl="rbg")
    projector = nnx.jit(lambda: make_projector(nnx.Rngs(key)))()
  student = Student(inputs["student"], projector)

  # dett_loss sees the models as pure functions of their state (projector=None: the
  # projector is part of the student).
  student_def, teacher_def = nnx.graphdef(student), nnx.graphdef(teacher)

  def student_fn(params, batch_stats, images, train, rng):
    model = nnx.merge(student_def, params, batch_stats)
    return model(images, train=train), nnx.state(model, nnx.BatchStat)

  def teacher_fn(teacher_state, images):
    return nnx.merge(teacher_def, teacher_state)(images, train=False)["feature_map"]

  loss_fn = functools.partial(dett_jax.dett_loss, student_fn=student_fn, teacher_fn=teacher_fn,
                              match=settings["match"])
  frozen = {"teacher": nnx.state(teacher), "head": head}

  lambda_up = int(settings["lambda_up"])
  epoch_batches = functools.partial(dett_jax.epoch_batches, train, batch_size=batch_size,
                                    seed=data_seed, error_set=inputs["error_set"],
                                    lambda_up=lambda_up, preprocess=preprocess, augment=augment)
  steps_per_epoch = len(epoch_batches(epoch=0))
  total_steps = max_steps or optim["epochs"] * steps_per_epoch
  warmup_steps = int(optim.get("warmup_epochs", 0) * steps_per_epoch)
  tx = optax.adamw(cosine_schedule(optim["learning_rate"], total_steps, warmup_steps),
                   weight_decay=optim["weight_decay"])
  optimizer = nnx.Optimizer(student, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(student: Student, optimizer: nnx.Optimizer, batch: dict,
                 frozen: dict) -> jax.Array:
    params, batch_stats = nnx.state(student, nnx.Param), nnx.state(student, nnx.BatchStat)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {"student": params}, {"student": batch_stats}, batch, frozen)
    nnx.update(student, aux["collections"]["student"])   # the new BatchNorm statistics
    optimizer.update(student, grads["student"])
    return loss

  @nnx.jit
  def predict(student: Student, images: jax.Array) -> jax.Array:
    return dett_jax.transplanted_logits(head, student(images, train=False))

  train_counts = train.group_counts()
  evaluate = lambda model, split: dett_jax.evaluate_groups(
      lambda x: predict(model, x), splits[split], train_counts, name=split, preprocess=preprocess)
  best, step = None, 0
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    for batch in epoch_batches(epoch=epoch):
      loss = train_step(student, optimizer, {"image": batch["image"], "label": batch["label"]},
                        frozen)
      step += 1
      if step == total_steps:
        break
    record = {"epoch": epoch + 1, "step": step, "loss": float(loss), **evaluate(student, "val")}
    print(f"epoch {epoch + 1}: step {record['step']}, feature loss {record['loss']:.4f}, "
          f"val worst group {record['val/worst_group_acc']:.3f}", flush=True)
    # Model selection by validation worst-group accuracy (or the last epoch).
    if (best is None or settings["select"] != "val_worst_group"
        or record["val/worst_group_acc"] > best[0]["val/worst_group_acc"]):
      best = (record, nnx.clone(student))
  record, student = best
  test = evaluate(student, "test")

  # The teacher with the same head, for comparison: DeTT should land close to it.
  teacher_logits = nnx.jit(lambda teacher, x: dett_jax.dense_apply(
      head, teacher(x, train=False)["features"]))
  teacher_test = dett_jax.evaluate_groups(lambda x: teacher_logits(teacher, x), splits["test"],
                                          train_counts, name="test", preprocess=preprocess)
  return {**{k: v for k, v in record.items() if k.startswith("val/")}, **test,
          "teacher/test/worst_group_acc": teacher_test["test/worst_group_acc"],
          "teacher/test/avg_acc": teacher_test["test/avg_acc"],
          "selected_epoch": record["epoch"], "steps": step,
          "error_set_size": int(len(inputs["error_set"])),
          "student_parameters": int(sum(x.size for x in jax.tree.leaves(
              nnx.state(student.backbone, nnx.Param))))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", default="", help="a finished train.py workdir to take the "
                      "teacher, pretrained student, error set and settings from")
  parser.add_argument("--steps", type=int, default=0,
                      help="train only this many steps (each stage; quick mode)")
  args = parser.parse_args(argv)
  start = time.time()
  inputs = from_run(args.run) if args.run else None
  config = inputs["config"] if inputs else DEFAULTS
  splits = dett_jax.load_splits(config["data"])
  preprocess = dett_jax.Preprocess.from_config(config["data"])
  if inputs is None:
    inputs = make_teacher(config, splits, preprocess, args.steps or None)
  results = distill(config, splits, preprocess, inputs, args.steps or None)
  results["seconds"] = round(time.time() - start, 1)
  for key in sorted(k for k in results if "test/" in k):
    print(f"{key:36s} {results[key]:.4f}")
  print(json.dumps({"example": "nnx", **results}))
  return results


if __name__ == "__main__":
  main()
