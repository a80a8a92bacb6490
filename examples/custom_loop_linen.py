"""DeTT inside a minimal hand-written Flax Linen training loop.

Only the public `dett_jax` API is used (plus jax, flax, optax, grain and numpy): no
trainer, no config system. The loop has its own optimizer (optax AdamW with a cosine
schedule), its own grain input pipeline and its own evaluation.

  python examples/custom_loop_linen.py              # everything from scratch (< 1 min on a CPU)
  python examples/custom_loop_linen.py --steps 4    # quick smoke run
  python examples/custom_loop_linen.py --run runs/demo   # the teacher, pretrained student and
                                                         # error set of a train.py run

Without `--run` the example first makes its own debiased teacher: a ResNet trained by
ERM on the biased training split, whose head is then refit by DFR on the validation split.
The ERM teacher also serves as the identification model: its training errors are the
error set. With `--run DIR` (a finished `python train.py --workdir DIR` run), the
teacher (`teacher_erm` + `teacher_dfr`, or `teacher_gdro`), the pretrained student
backbone and the error set (`identification`) come from that run, and the data, seed and
distillation settings from its `config.json`, so the result can be compared with the run's
`student_dett`.

Then DeTT: the student ResNet (no head of its own) plus a projector learn to match the
teacher's last-stage feature map on the upsampled training set; the student predicts
with the teacher's (DFR) head, transplanted and frozen. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
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


def init_key(seed: int) -> jax.Array:
  """A key for initialising parameters. The "rbg" generator compiles several times faster
  than JAX's default (threefry) on CPU, which is most of this example's start-up time."""
  return jax.random.key(seed, impl="rbg")


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
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in fixed-size batches (padding has mask 0)."""
  images = preprocess.normalize(np.stack([preprocess.eval(im) for im in split.images]))
  for start in range(0, len(split), batch_size):
    index = np.arange(start, start + batch_size)
    mask = (index < len(split)).astype(np.float32)
    index = np.minimum(index, len(split) - 1)
    yield {"image": images[index], "label": split.labels[index], "group": split.groups[index],
           "mask": mask}


def per_example(fn: Any, split: dett_jax.Split, preprocess: dett_jax.Preprocess,
                batch_size: int) -> np.ndarray:
  """`fn(images)` for every example of `split`, in order, `[n, ...]`."""
  outputs = [np.asarray(fn(b["image"])) for b in eval_batches(split, preprocess, batch_size)]
  return np.concatenate(outputs)[:len(split)]


# ---------------------------------------------------------------------------
# Evaluation: per-group accuracy.
# ---------------------------------------------------------------------------

def group_counts(logits: jax.Array, batch: dict[str, jax.Array], num_groups: int) -> dict:
  """Per-group numbers of correct predictions and of examples in one batch (on device)."""
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"correct": dett_jax.group_sums(correct, batch["group"], batch["mask"], num_groups),
          "count": dett_jax.group_sums(jnp.ones_like(correct), batch["group"], batch["mask"],
                                       num_groups)}


def evaluate(batch_sums: Any, split: dett_jax.Split, preprocess: dett_jax.Preprocess,
             train_counts: np.ndarray, name: str, batch_size: int = 256) -> dict[str, float]:
  """Group metrics on `split` (keys "<name>/..."), from `batch_sums(batch)` (`group_counts`)."""
  accumulator = dett_jax.GroupAccumulator()
  for batch in eval_batches(split, preprocess, batch_size):
    accumulator.update(**jax.device_get(batch_sums(batch)))
  totals = accumulator.totals()
  return dett_jax.group_accuracy_metrics(totals["correct"], totals["count"], train_counts, split=name)


# ---------------------------------------------------------------------------
# Teacher and error set: from a train.py run, or made here.
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
  # The distilled teacher (distill.teacher): DFR's head on the ERM backbone, or a group-DRO
  # teacher's own backbone and head, or the ERM teacher.
  stage = "teacher_gdro" if config["distill"]["teacher"] == "gdro" else "teacher_erm"
  teacher_vars = dett_jax.load_variables(os.path.join(run_dir, stage, "final"))
  head = teacher_vars["params"]["head"]
  if config["distill"]["teacher"] == "dfr":
    head = dett_jax.load_variables(os.path.join(run_dir, "teacher_dfr", "final"))
  student_vars = dett_jax.load_variables(os.path.join(run_dir, "pretrain_student", "final"))
  student_vars["params"].pop("head")  # the pretraining task's head; DeTT uses the teacher's
  teacher_vars, head, student_vars = jax.device_put((teacher_vars, head, student_vars))
  return {"config": config, "teacher_vars": teacher_vars, "head": head,
          "student_vars": student_vars, "error_set": error_set, "from_run": True}


def train_erm(model: Any, variables: dict[str, Any], split: dett_jax.Split,
              preprocess: dett_jax.Preprocess, config: dict[str, Any], steps: int,
              learning_rate: float, seed: int, error_set: np.ndarray | None = None,
              lambda_up: int = 1) -> dict[str, Any]:
  """Cross-entropy training of a Linen classifier (own loop); with `error_set`, JTT."""
  tx = optax.adamw(cosine_schedule(learning_rate, steps), weight_decay=1e-4)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def erm_step(params, batch_stats, opt_state, batch):
    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                 train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  step, epoch = 0, 0
  while step < steps:
    for batch in train_batches(split, preprocess, batch_size=config["batch_size"], seed=seed,
                               epoch=epoch, augment=config["augment"], error_set=error_set,
                               lambda_up=lambda_up):
      params, batch_stats, opt_state, loss = erm_step(params, batch_stats, opt_state, batch)
      step += 1
      if step == steps:
        break
    epoch += 1
  return {"params": params, "batch_stats": batch_stats}


def make_teacher(config: dict[str, Any], splits: dict[str, dett_jax.Split],
                 preprocess: dett_jax.Preprocess, max_steps: int | None) -> dict[str, Any]:
  """The error set (a briefly trained ERM student) and a debiased (JTT) teacher, own loops."""
  train, size, seed = splits["train"], config["data"]["image_size"], config["seed"]
  images = jnp.zeros((1, size, size, 3))
  steps = lambda n: min(n, max_steps or n)
  # 1. Identification: ERM of the student's architecture, briefly; its training errors.
  arch = config["student"]
  id_model = dett_jax.create_resnet(arch["depth"], train.num_classes, arch["width"], arch["stem"])
  initial = jax.jit(id_model.init)(init_key(seed + 2), images)
  id_vars = train_erm(id_model, initial, train, preprocess, config,
                      steps(config["identification"]["steps"]),
                      config["identification"]["learning_rate"], seed + 4)
  predict_id = jax.jit(lambda x: id_model.apply(id_vars, x, train=False)["logits"])
  error_set = dett_jax.find_error_set(per_example(predict_id, train, preprocess, 256), train.labels)
  # 2. A debiased teacher without group labels: JTT (ERM on the upsampled training set).
  arch = config["teacher"]
  teacher = dett_jax.create_resnet(arch["depth"], train.num_classes, arch["width"], arch["stem"])
  teacher_vars = train_erm(teacher, jax.jit(teacher.init)(init_key(seed + 1), images), train,
                           preprocess, config, steps(arch["steps"]), arch["learning_rate"],
                           seed + 3, error_set, int(config["distill"]["lambda_up"]))
  print(f"error set: {len(error_set)} of {len(train)} training examples; teacher trained "
        f"{steps(arch['steps'])} steps (JTT)")
  # The student starts from the identification model's initial backbone (its head dropped).
  student_vars = {"params": {k: v for k, v in initial["params"].items() if k != "head"},
                  "batch_stats": initial["batch_stats"]}
  return {"teacher_vars": teacher_vars, "head": dett_jax.read_head(teacher_vars["params"]),
          "student_vars": student_vars, "error_set": error_set, "from_run": False}


# ---------------------------------------------------------------------------
# DeTT.
# ---------------------------------------------------------------------------

def distill(config: dict[str, Any], splits: dict[str, dett_jax.Split],
            preprocess: dett_jax.Preprocess, inputs: dict[str, Any],
            max_steps: int | None) -> dict[str, Any]:
  """Trains the student by DeTT; returns the selected model's val and test metrics."""
  train, settings = splits["train"], config["distill"]
  optim, seed, size = settings["optim"], config["seed"], config["data"]["image_size"]
  batch_size = optim.get("batch_size") or config["batch_size"]
  augment = optim.get("augment", config["augment"])
  teacher = dett_jax.create_resnet(config["teacher"]["depth"], train.num_classes,
                                   config["teacher"]["width"], config["teacher"]["stem"])
  student = dett_jax.create_resnet(config["student"]["depth"], None, config["student"]["width"],
                                   config["student"]["stem"])   # no head: it gets the teacher's
  images = jnp.zeros((1, size, size, 3))
  student_vars = inputs["student_vars"]
  teacher_vars, frozen = inputs["teacher_vars"], {"teacher": inputs["teacher_vars"],
                                                  "head": inputs["head"]}

  def student_fn(params, batch_stats, images, train):
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return student.apply(variables, images, train=False)["feature_map"], batch_stats
    out, updates = student.apply(variables, images, train=True, mutable=["batch_stats"])
    return out["feature_map"], updates["batch_stats"]

  def teacher_fn(variables, images):
    return teacher.apply(variables, images, train=False)["feature_map"]

  teacher_map = jax.eval_shape(teacher_fn, teacher_vars, images)
  student_map = jax.eval_shape(lambda v: student_fn(v["params"], v["batch_stats"], images, False)[0],
                               student_vars)
  projector = dett_jax.Projector(settings["projector"], teacher_map.shape[-1],
                                 settings["projector_factor"])
  # train.py's seed for its dett student; with --run the projector starts as there.
  stage_seed = seed * 1000 + 10
  projector_vars = jax.jit(projector.init)(jax.random.key(stage_seed), jnp.zeros(student_map.shape))
  params = {"student": student_vars["params"], "projector": projector_vars["params"]}
  model_state = {"student": student_vars["batch_stats"],
                 "projector": projector_vars.get("batch_stats", {})}

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

  def val_metrics(state):
    return evaluate(lambda b: eval_sums(state.params, state.model_state, frozen, b),
                    splits["val"], preprocess, train_counts, "val")

  best, history = None, []
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    batches = train_batches(train, preprocess, batch_size=batch_size, seed=stage_seed,
                            epoch=epoch, augment=augment, error_set=inputs["error_set"],
                            lambda_up=lambda_up, as_train_py=inputs["from_run"])
    for batch in batches:
      state, metrics = step(state, batch, frozen)
      if int(state.step) == total_steps:
        break
    record = {"epoch": epoch + 1, "step": int(state.step), "loss": float(metrics["loss"]),
              **val_metrics(state)}
    history.append(record)
    print(f"epoch {epoch + 1}: step {record['step']}, feature loss {record['loss']:.4f}, "
          f"val worst group {record['val/worst_group_acc']:.3f}", flush=True)
    # Model selection by validation worst-group accuracy (or the last epoch).
    if (best is None or settings["select"] != "val_worst_group"
        or record["val/worst_group_acc"] > best[0]["val/worst_group_acc"]):
      best = (record, jax.tree.map(jnp.copy, (state.params, state.model_state)))
  record, (params, model_state) = best
  test = evaluate(lambda b: eval_sums(params, model_state, frozen, b), splits["test"],
                  preprocess, train_counts, "test")

  # The teacher with the same head, for comparison: DeTT should land close to it.
  @jax.jit
  def teacher_sums(frozen, batch):
    features = teacher.apply(frozen["teacher"], batch["image"], train=False)["features"]
    return group_counts(dett_jax.dense_apply(frozen["head"], features), batch, len(train_counts))

  teacher_test = evaluate(lambda b: teacher_sums(frozen, b), splits["test"], preprocess,
                          train_counts, "test")
  return {**{k: v for k, v in record.items() if k.startswith("val/")}, **test,
          "teacher/test/worst_group_acc": teacher_test["test/worst_group_acc"],
          "teacher/test/avg_acc": teacher_test["test/avg_acc"],
          "selected_epoch": record["epoch"], "steps": int(state.step),
          "error_set_size": int(len(inputs["error_set"]))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", default="", help="a finished train.py workdir to take the "
                      "teacher, pretrained student, error set and settings from")
  parser.add_argument("--steps", type=int, default=0,
                      help="train only this many steps (teacher and student; quick mode)")
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
  print(json.dumps({"example": "custom_loop_linen", **results}))
  return results


if __name__ == "__main__":
  main()
