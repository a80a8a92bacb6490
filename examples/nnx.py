"""DeTT with Flax NNX student and teacher, in a hand-written training loop.

Only the public `dett_jax` API is used (plus jax, flax, optax, grain and numpy). The
models are plain `nnx.Module`s; the ERM stages use idiomatic NNX (`nnx.Optimizer`,
`nnx.jit`), and the DeTT step, being pure, sees the models through `nnx.split` /
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
run, and data, seed and distillation settings from its `config.json`. The NNX ResNet below
computes exactly what `dett_jax.create_resnet` computes, and its attribute names follow
that model's parameter names, so train.py's checkpoints load by name.

Then DeTT: the student (no head of its own) plus a projector learn to match the
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
from typing import Any, Iterator

import grain
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


def load_linen_variables(model: ResNet, variables: dict[str, Any]) -> ResNet:
  """Copies `dett_jax.create_resnet` variables (e.g. saved by train.py) into `model`."""

  def merge(a: dict, b: dict) -> dict:  # params and batch_stats -> one tree per module
    out = dict(a)
    for key, value in b.items():
      out[key] = merge(out[key], value) if key in out else value
    return out

  state = nnx.state(model)
  tree = jax.device_put(merge(variables["params"], variables.get("batch_stats", {})))
  if len(jax.tree.leaves(tree)) != len(jax.tree.leaves(state)):
    raise ValueError(f"the variables have {len(jax.tree.leaves(tree))} arrays, the model "
                     f"{len(jax.tree.leaves(state))}: another architecture?")
  nnx.replace_by_pure_dict(state, tree)   # names must match (ValueError otherwise)
  nnx.update(model, state)
  return model


# ---------------------------------------------------------------------------
# Data: a grain pipeline of our own, with DeTT's upsampling.
# ---------------------------------------------------------------------------

class LoadExample(grain.transforms.RandomMap):
  """Training-set index -> augmented example (uint8 image, label)."""

  def __init__(self, split: dett_jax.Split, preprocess: dett_jax.Preprocess, augment: bool):
    self.split, self.preprocess, self.augment = split, preprocess, augment

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = self.split.images[int(index)]
    image = self.preprocess.train(image, rng) if self.augment else self.preprocess.eval(image)
    return {"image": image, "label": self.split.labels[int(index)]}


def train_batches(split: dett_jax.Split, preprocess: dett_jax.Preprocess, *, batch_size: int,
                  seed: int, epoch: int, augment: bool, error_set: np.ndarray | None = None,
                  lambda_up: int = 1, as_train_py: bool = False) -> grain.MapDataset:
  """One epoch of batches: error-set examples repeated `lambda_up` times, shuffled by epoch.

  `as_train_py`: the batches train.py draws for the same seed (the library's pipeline,
  `dett_jax.train_epoch`), so that this loop and a train.py run can be compared.
  """
  if as_train_py:
    index_list = dett_jax.upsampled_indices(len(split), error_set, lambda_up)
    return dett_jax.train_epoch(split, index_list, global_batch_size=batch_size, epoch=epoch,
                                seed=seed, preprocess=preprocess, augment_images=augment)
  examples = dett_jax.upsample(grain.MapDataset.range(len(split)), error_set, lambda_up)
  return (examples.seed(seed * 1000 + epoch).shuffle()
          .random_map(LoadExample(split, preprocess, augment))
          .batch(batch_size, drop_remainder=True)
          .map(lambda b: {**b, "image": preprocess.normalize(b["image"])}))


def cosine_schedule(peak: float, total_steps: int) -> optax.Schedule:
  """Cosine decay from `peak` to 0 (after one step at the peak, as train.py's schedule)."""
  return optax.warmup_cosine_decay_schedule(peak, peak, 1, total_steps)


def eval_batches(split: dett_jax.Split, preprocess: dett_jax.Preprocess,
                 batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in fixed-size batches (padding has mask 0)."""
  images = preprocess.normalize(np.stack([preprocess.eval(im) for im in split.images]))
  for start in range(0, len(split), batch_size):
    index = np.arange(start, start + batch_size)
    mask = (index < len(split)).astype(np.float32)
    index = np.minimum(index, len(split) - 1)
    yield {"image": images[index], "label": split.labels[index], "group": split.groups[index],
           "mask": mask}


def group_counts(logits: jax.Array, batch: dict[str, jax.Array], num_groups: int) -> dict:
  """Per-group numbers of correct predictions and of examples in one batch (on device)."""
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": dett_jax.group_sums(correct, batch["group"], batch["mask"], num_groups),
          "count": dett_jax.group_sums(jnp.ones_like(correct), batch["group"], batch["mask"],
                                       num_groups)}


def evaluate(batch_sums: Any, split: dett_jax.Split, preprocess: dett_jax.Preprocess,
             train_counts: np.ndarray, name: str) -> dict[str, float]:
  """Group metrics on `split` (keys "<name>/..."), from `batch_sums(batch)` (`group_counts`)."""
  accumulator = dett_jax.GroupAccumulator()
  for batch in eval_batches(split, preprocess):
    accumulator.update(**jax.device_get(batch_sums(batch)))
  totals = accumulator.totals()
  return dett_jax.group_accuracy_metrics(totals["correct"], totals["count"], train_counts, split=name)


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
    for batch in train_batches(split, preprocess, batch_size=config["batch_size"], seed=seed,
                               epoch=epoch, augment=config["augment"], error_set=error_set,
                               lambda_up=lambda_up):
      erm_step(model, optimizer, batch)
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
  predictions = np.concatenate([np.asarray(logits(id_model, b["image"]))
                                for b in eval_batches(train, preprocess)])[:len(train)]
  error_set = dett_jax.find_error_set(predictions, train.labels)
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
# DeTT, through nnx.split / nnx.merge.
# ---------------------------------------------------------------------------

def distill(config: dict[str, Any], splits: dict[str, dett_jax.Split],
            preprocess: dett_jax.Preprocess, inputs: dict[str, Any],
            max_steps: int | None) -> dict[str, Any]:
  """Trains the student by DeTT; returns the selected model's val and test metrics."""
  train, settings = splits["train"], config["distill"]
  optim, seed = settings["optim"], config["seed"]
  batch_size = optim.get("batch_size") or config["batch_size"]
  augment = optim.get("augment", config["augment"])

  # The models as pure functions of their state.
  student_def, student_params, student_stats = nnx.split(inputs["student"], nnx.Param, nnx.BatchStat)
  teacher_def, teacher_state = nnx.split(inputs["teacher"])

  def student_fn(params, batch_stats, images, train):
    model = nnx.merge(student_def, params, batch_stats)
    feature_map = model(images, train=train)["feature_map"]
    return feature_map, nnx.state(model, nnx.BatchStat)   # BatchNorm statistics, updated

  def teacher_fn(teacher_state, images):
    return nnx.merge(teacher_def, teacher_state)(images, train=False)["feature_map"]

  size = config["data"]["image_size"]
  images = jnp.zeros((1, size, size, 3))
  teacher_map = jax.eval_shape(teacher_fn, teacher_state, images)
  student_map = jax.eval_shape(lambda p, s: student_fn(p, s, images, False)[0],
                               student_params, student_stats)
  projector = dett_jax.Projector(settings["projector"], teacher_map.shape[-1],
                                 settings["projector_factor"])
  # train.py's seed for its dett student; with --run the projector starts as there.
  stage_seed = seed * 1000 + 10
  projector_vars = jax.jit(projector.init)(jax.random.key(stage_seed), jnp.zeros(student_map.shape))
  params = {"student": student_params, "projector": projector_vars["params"]}
  model_state = {"student": student_stats, "projector": projector_vars.get("batch_stats", {})}
  frozen = {"teacher": teacher_state, "head": inputs["head"]}

  lambda_up = int(settings["lambda_up"])
  epoch_size = len(dett_jax.upsampled_indices(len(train), inputs["error_set"], lambda_up))
  steps_per_epoch = epoch_size // batch_size
  total_steps = max_steps or optim["epochs"] * steps_per_epoch
  tx = optax.adamw(cosine_schedule(optim["learning_rate"], total_steps),
                   weight_decay=optim["weight_decay"])
  state = dett_jax.DeTTState.create(params, model_state, tx)
  step = jax.jit(dett_jax.make_dett_step(student_fn, tx, projector=projector,
                                         teacher_fn=teacher_fn, match=settings["match"]),
                 donate_argnums=0)
  predict = dett_jax.make_dett_predict(student_fn, projector)
  train_counts = train.group_counts()

  @jax.jit
  def eval_sums(params, model_state, frozen, batch):
    return group_counts(predict(params, model_state, batch["image"], frozen), batch,
                        len(train_counts))

  best = None
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    for batch in train_batches(train, preprocess, batch_size=batch_size, seed=stage_seed,
                               epoch=epoch, augment=augment, error_set=inputs["error_set"],
                               lambda_up=lambda_up, as_train_py=inputs["from_run"]):
      state, metrics = step(state, batch, frozen)
      if int(state.step) == total_steps:
        break
    record = {"epoch": epoch + 1, "step": int(state.step), "loss": float(metrics["loss"]),
              **evaluate(lambda b: eval_sums(state.params, state.model_state, frozen, b),
                         splits["val"], preprocess, train_counts, "val")}
    print(f"epoch {epoch + 1}: step {record['step']}, feature loss {record['loss']:.4f}, "
          f"val worst group {record['val/worst_group_acc']:.3f}", flush=True)
    # Model selection by validation worst-group accuracy (or the last epoch).
    if (best is None or settings["select"] != "val_worst_group"
        or record["val/worst_group_acc"] > best[0]["val/worst_group_acc"]):
      best = (record, jax.tree.map(jnp.copy, (state.params, state.model_state)))
  record, (params, model_state) = best
  # Back to a stateful NNX student, e.g. to save or to use elsewhere.
  student = nnx.merge(student_def, params["student"], model_state["student"])
  test = evaluate(lambda b: eval_sums(params, model_state, frozen, b), splits["test"],
                  preprocess, train_counts, "test")

  @nnx.jit
  def teacher_sums(teacher: ResNet, head: dict, batch: dict) -> dict:
    features = teacher(batch["image"], train=False)["features"]
    return group_counts(dett_jax.dense_apply(head, features), batch, len(train_counts))

  teacher_test = evaluate(lambda b: teacher_sums(inputs["teacher"], inputs["head"], b),
                          splits["test"], preprocess, train_counts, "test")
  return {**{k: v for k, v in record.items() if k.startswith("val/")}, **test,
          "teacher/test/worst_group_acc": teacher_test["test/worst_group_acc"],
          "teacher/test/avg_acc": teacher_test["test/avg_acc"],
          "selected_epoch": record["epoch"], "steps": int(state.step),
          "error_set_size": int(len(inputs["error_set"])),
          "student_parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param))))}


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
