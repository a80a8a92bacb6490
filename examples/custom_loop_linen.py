"""DeTT as a loss in a hand-written Flax Linen loop (`flax.training.train_state.TrainState`).

Only the public `dett_jax` API is used (plus jax, flax, optax and numpy): no trainer, no
config system. The DeTT step is the loop's own: `jax.value_and_grad` of
`dett_jax.dett_loss`, then Flax's `TrainState.apply_gradients`, with an optax AdamW and
cosine schedule of its own.

  python examples/custom_loop_linen.py              # everything from scratch (< 1 min on a CPU)
  python examples/custom_loop_linen.py --steps 4    # quick smoke run
  python examples/custom_loop_linen.py --run runs/demo   # the teacher, pretrained student and
                                                         # error set of a train.py run

Without `--run` the example first makes its own error set (the training mistakes of a
briefly trained ERM model of the student's architecture) and a debiased teacher without
group labels (JTT: ERM on the training set with the error set upsampled). With `--run DIR`
(a finished `python train.py --workdir DIR` run), the teacher (`teacher_erm` +
`teacher_dfr`, or `teacher_gdro`), the pretrained student backbone and the error set
(`identification`) come from that run, and the data, seed and distillation settings from
its `config.json`; the loop then draws train.py's batches and initial projector, so the
result can be compared with the run's `student_dett` (benchmarks/examples_match.py).

Then DeTT: the student ResNet (no head of its own) plus a projector learn to match the
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
from flax.training import train_state

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


def cosine_schedule(peak: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warmup from 0 (none: one step at the peak), then cosine decay to 0: train.py's."""
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else peak, peak,
                                            max(warmup_steps, 1), total_steps)


class TrainState(train_state.TrainState):
  """Flax's train state, plus the BatchNorm statistics that `dett_loss` updates."""

  collections: Any = None


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
  if config["distill"]["optim"].get("optimizer", "adamw") != "adamw":
    raise SystemExit(f"{run_dir} distils with {config['distill']['optim']['optimizer']}; this "
                     "example's optimizer is AdamW (train.py's default)")
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
    return optax.apply_updates(params, updates), batch_stats, opt_state

  step, epoch = 0, 0
  while step < steps:
    for batch in dett_jax.epoch_batches(split, batch_size=config["batch_size"], epoch=epoch,
                                        seed=seed, error_set=error_set, lambda_up=lambda_up,
                                        preprocess=preprocess, augment=config["augment"]):
      params, batch_stats, opt_state = erm_step(params, batch_stats, opt_state,
                                                {"image": batch["image"], "label": batch["label"]})
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
  error_set = dett_jax.find_error_set(
      dett_jax.split_outputs(predict_id, train, preprocess=preprocess), train.labels)
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
# DeTT: dett_loss under jax.value_and_grad, Flax's TrainState.apply_gradients.
# ---------------------------------------------------------------------------

def distill(config: dict[str, Any], splits: dict[str, dett_jax.Split],
            preprocess: dett_jax.Preprocess, inputs: dict[str, Any],
            max_steps: int | None) -> dict[str, Any]:
  """Trains the student by DeTT; returns the selected model's val and test metrics."""
  train, settings = splits["train"], config["distill"]
  optim, seed, size = settings["optim"], config["seed"], config["data"]["image_size"]
  batch_size = optim.get("batch_size") or config["batch_size"]
  augment = config["augment"] if optim.get("augment") is None else optim["augment"]
  teacher = dett_jax.create_resnet(config["teacher"]["depth"], train.num_classes,
                                   config["teacher"]["width"], config["teacher"]["stem"])
  student = dett_jax.create_resnet(config["student"]["depth"], None, config["student"]["width"],
                                   config["student"]["stem"])   # no head: it gets the teacher's
  frozen = {"teacher": inputs["teacher_vars"], "head": inputs["head"]}

  def student_fn(params, collections, images, train, rng):
    """The student's feature map and its new BatchNorm statistics (`dett_loss`'s student)."""
    variables = {"params": params, **collections}
    if not train:
      return student.apply(variables, images, train=False)["feature_map"], collections
    out, collections = student.apply(variables, images, train=True, mutable=["batch_stats"])
    return out["feature_map"], collections

  def teacher_fn(variables, images):
    return teacher.apply(variables, images, train=False)["feature_map"]

  images = jnp.zeros((1, size, size, 3))
  student_vars = inputs["student_vars"]
  teacher_map = jax.eval_shape(teacher_fn, inputs["teacher_vars"], images)
  student_map = jax.eval_shape(lambda p, c: student_fn(p, c, images, False, None)[0],
                               student_vars["params"], {"batch_stats": student_vars["batch_stats"]})
  projector = dett_jax.Projector(settings["projector"], teacher_map.shape[-1],
                                 settings["projector_factor"])
  if inputs["from_run"]:   # train.py's data order and initial projector for its dett student
    data_seed = dett_jax.rng.seed(config["seed"], "student_dett", "data")
    key = jax.random.split(jax.random.key(dett_jax.rng.seed(config["seed"], "student_dett", "init")))[1]
  else:
    data_seed, key = seed + 10, init_key(seed + 5)
  projector_vars = jax.jit(projector.init)(key, jnp.zeros(student_map.shape))
  params = {"student": student_vars["params"], "projector": projector_vars["params"]}
  collections = {"student": {"batch_stats": student_vars["batch_stats"]},
                 "projector": {k: v for k, v in projector_vars.items() if k != "params"}}

  lambda_up = int(settings["lambda_up"])
  epoch_batches = functools.partial(dett_jax.epoch_batches, train, batch_size=batch_size,
                                    seed=data_seed, error_set=inputs["error_set"],
                                    lambda_up=lambda_up, preprocess=preprocess, augment=augment)
  steps_per_epoch = len(epoch_batches(epoch=0))
  total_steps = max_steps or optim["epochs"] * steps_per_epoch
  warmup_steps = int(optim.get("warmup_epochs", 0) * steps_per_epoch)
  tx = optax.adamw(cosine_schedule(optim["learning_rate"], total_steps, warmup_steps),
                   weight_decay=optim["weight_decay"])
  state = TrainState.create(apply_fn=student.apply, params=params, tx=tx, collections=collections)

  # The DeTT step: the public loss, differentiated and applied by the loop itself.
  loss_fn = functools.partial(dett_jax.dett_loss, student_fn=student_fn, projector=projector,
                              teacher_fn=teacher_fn, match=settings["match"])

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, jax.Array]:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.collections, batch, frozen)
    return state.apply_gradients(grads=grads, collections=aux["collections"]), loss

  predict = jax.jit(dett_jax.make_dett_predict(student_fn, projector))
  train_counts = train.group_counts()

  def evaluate(params, collections, split):
    return dett_jax.evaluate_groups(lambda x: predict(params, collections, x, frozen),
                                    splits[split], train_counts, name=split, preprocess=preprocess)

  best = None
  for epoch in range(math.ceil(total_steps / steps_per_epoch)):
    for batch in epoch_batches(epoch=epoch):
      state, loss = train_step(state, {"image": batch["image"], "label": batch["label"]}, frozen)
      if int(state.step) == total_steps:
        break
    record = {"epoch": epoch + 1, "step": int(state.step), "loss": float(loss),
              **evaluate(state.params, state.collections, "val")}
    print(f"epoch {epoch + 1}: step {record['step']}, feature loss {record['loss']:.4f}, "
          f"val worst group {record['val/worst_group_acc']:.3f}", flush=True)
    # Model selection by validation worst-group accuracy (or the last epoch).
    if (best is None or settings["select"] != "val_worst_group"
        or record["val/worst_group_acc"] > best[0]["val/worst_group_acc"]):
      best = (record, jax.tree.map(jnp.copy, (state.params, state.collections)))
  record, (params, collections) = best
  test = evaluate(params, collections, "test")

  # The teacher with the same head, for comparison: DeTT should land close to it.
  teacher_logits = jax.jit(lambda x: dett_jax.dense_apply(
      frozen["head"], teacher.apply(frozen["teacher"], x, train=False)["features"]))
  teacher_test = dett_jax.evaluate_groups(teacher_logits, splits["test"], train_counts,
                                          name="test", preprocess=preprocess)
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
