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
by DeTT. Here the transplanted head lives *inside* the student's parameter tree
(`transplant_head`) and the optimizer freezes it (`freeze`); the input pipeline is the
library's (`upsampled_indices` + `train_epoch`). Group metrics of the teacher (ERM and
DFR heads) and of the student are printed; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any, Iterator

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
# Data: the library's pipeline (index lists, per-epoch shuffles, augmentation).
# ---------------------------------------------------------------------------

def epochs(split: dett_jax.Split, preprocess: dett_jax.Preprocess, index_list: np.ndarray,
           batch_size: int, seed: int) -> Iterator[tuple[int, Any]]:
  """(epoch, that epoch's batches) forever; each epoch reshuffles `index_list`."""
  epoch = 0
  while True:
    yield epoch, dett_jax.train_epoch(split, index_list, global_batch_size=batch_size,
                                      epoch=epoch, seed=seed, preprocess=preprocess)
    epoch += 1


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


def per_example(fn: Any, split: dett_jax.Split, preprocess: dett_jax.Preprocess) -> np.ndarray:
  """`fn(images)` for every example of `split`, in order, `[n, ...]`."""
  return np.concatenate([np.asarray(fn(b["image"])) for b in eval_batches(split, preprocess)]
                        )[:len(split)]


def group_metrics(logits_fn: Any, split: dett_jax.Split, preprocess: dett_jax.Preprocess,
                  train_counts: np.ndarray, name: str) -> dict[str, float]:
  """Group metrics of `logits_fn(images)` (a jitted function) on `split`."""
  num_groups = len(train_counts)
  accumulator = dett_jax.GroupAccumulator()
  for batch in eval_batches(split, preprocess):
    correct = np.argmax(np.asarray(logits_fn(batch["image"])), -1) == batch["label"]
    accumulator.update(correct=dett_jax.group_sums(correct, batch["group"], batch["mask"], num_groups),
                       count=dett_jax.group_sums(np.ones(len(correct)), batch["group"],
                                                 batch["mask"], num_groups))
  totals = accumulator.totals()
  return dett_jax.group_accuracy_metrics(totals["correct"], totals["count"], train_counts, split=name)


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

  step = 0
  for _, batches in epochs(split, preprocess, np.arange(len(split)), batch_size, seed):
    for batch in batches:
      params, batch_stats, opt_state = erm_step(params, batch_stats, opt_state,
                                                {"image": batch["image"], "label": batch["label"]})
      step += 1
      if step == steps:
        return {"params": params, "batch_stats": batch_stats}
  raise AssertionError("unreachable")


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
    dfr = dett_jax.fit_dfr(per_example(lambda x: teacher_apply(x)["features"], val, preprocess),
                           val.labels, val.groups, num_classes=val.num_classes, num_refits=4,
                           seed=seed)
    head = dett_jax.dense_params(dfr)
  teacher_logits = lambda head: jax.jit(
      lambda x: dett_jax.dense_apply(head, teacher_apply(x)["features"]))
  teacher_erm = group_metrics(teacher_logits(dett_jax.read_head(teacher_vars["params"])),
                              splits["test"], preprocess, train_counts, "test")
  teacher_debiased = group_metrics(teacher_logits(head), splits["test"], preprocess,
                                   train_counts, "test")

  # 3. The error set: the training mistakes of a briefly trained ERM model (the
  #    student's architecture with a head).
  s_arch = SETTINGS["student"]
  id_model = dett_jax.create_resnet(s_arch["depth"], train.num_classes, s_arch["width"], s_arch["stem"])
  initial = jax.jit(id_model.init)(init_key(seed + 2), images)
  id_vars = train_erm(id_model, initial, train, preprocess, limit(SETTINGS["identification"]["steps"]),
                      SETTINGS["identification"]["learning_rate"], batch_size, seed + 4)
  id_logits = jax.jit(lambda x: id_model.apply(id_vars, x, train=False)["logits"])
  error_set = dett_jax.find_error_set(per_example(id_logits, train, preprocess), train.labels)

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
  model_state = {"student": student_vars["batch_stats"], "projector": projector_vars["batch_stats"]}

  def student_fn(params, batch_stats, images, train):
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return student.apply(variables, images, train=False)["feature_map"], batch_stats
    out, updates = student.apply(variables, images, train=True, mutable=["batch_stats"])
    return out["feature_map"], updates["batch_stats"]

  index_list = dett_jax.upsampled_indices(len(train), error_set, int(settings["lambda_up"]))
  steps_per_epoch = len(index_list) // batch_size
  total_steps = args.steps or settings["epochs"] * steps_per_epoch
  tx = dett_jax.freeze(optax.adamw(optax.cosine_decay_schedule(settings["learning_rate"], total_steps),
                                   weight_decay=settings["weight_decay"]), ["head"])
  step = jax.jit(dett_jax.make_dett_step(
      student_fn, tx, projector=projector,
      teacher_fn=lambda v, x: teacher.apply(v, x, train=False)["feature_map"]))
  predict = jax.jit(dett_jax.make_dett_predict(student_fn, projector))
  state = dett_jax.DeTTState.create(params, model_state, tx)
  frozen = {"teacher": teacher_vars}          # no "head": the step reads params["head"]
  best = None
  for epoch, batches in epochs(train, preprocess, index_list, batch_size, seed + 10):
    for batch in batches:
      state, metrics = step(state, {"image": batch["image"], "label": batch["label"]}, frozen)
      if int(state.step) == total_steps:
        break
    val_metrics = group_metrics(lambda x: predict(state.params, state.model_state, x, {}), val,
                                preprocess, train_counts, "val")
    print(f"epoch {epoch + 1}: step {int(state.step)}, feature loss {float(metrics['loss']):.4f}, "
          f"val worst group {val_metrics['val/worst_group_acc']:.3f}", flush=True)
    if best is None or val_metrics["val/worst_group_acc"] > best[0]["val/worst_group_acc"]:
      best = (val_metrics, epoch + 1, jax.tree.map(jnp.copy, (state.params, state.model_state)))
    if int(state.step) == total_steps or epoch + 1 == math.ceil(total_steps / steps_per_epoch):
      break
  val_metrics, selected_epoch, (params, model_state) = best
  assert np.array_equal(np.asarray(params["head"]["kernel"]), np.asarray(head["kernel"]))  # frozen
  test = group_metrics(lambda x: predict(params, model_state, x, {}), splits["test"], preprocess,
                       train_counts, "test")
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
