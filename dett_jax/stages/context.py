"""What every stage shares: the run's context, the stage runner and the trainer glue.

A stage writes its outputs under `<workdir>/<stage>/` and a `done.json` last; a re-run
skips finished stages (loading their outputs) and resumes an interrupted one from its
latest checkpoint (`training.loop.fit`).
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
from jax.sharding import Mesh

from dett_jax import console, distributed, rng
from dett_jax.checkpoints import load_variables, mark_done, save_variables, stage_done
from dett_jax.config_schema import OPTIM_LATER
from dett_jax.data import Preprocess, Split, Tokenize
from dett_jax.data.pipeline import eval_batches, train_batches
from dett_jax.evaluation import accumulate, split_metrics
from dett_jax.methods.base import INPUT_KEYS, Method, model_inputs
from dett_jax.optimizers import make_optimizer
from dett_jax.sharding import place, replicate, shard_batch
from dett_jax.training.loop import FitSpec, Interrupted, MetricLogger, fit, stop_requested
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_train_step

Tree = Any


@dataclasses.dataclass
class Context:
  """What every stage needs: config, data, mesh, logger, values computed once per run."""

  config: ml_collections.ConfigDict
  workdir: str
  splits: dict[str, Split]
  mesh: Mesh
  logger: MetricLogger
  preprocess: Preprocess | Tokenize  # images' transforms, or the text tokenizer
  memo: dict = dataclasses.field(default_factory=dict)

  def place(self, tree: Tree) -> Tree:
    """`tree` on the mesh, sharded by the config's strategy and rules (FSDP or replicated)."""
    return place(tree, self.mesh, self.config.mesh.strategy, tuple(self.config.mesh.rules))

  def fit_options(self) -> dict[str, Any]:
    """The `FitSpec` fields every stage takes from the config."""
    config = self.config
    return dict(log_every_steps=config.log_every_steps,
                checkpoint_every_steps=config.checkpoint_every_steps,
                checkpoint_every_minutes=config.checkpoint_every_minutes,
                keep_checkpoints=config.keep_checkpoints, on_nonfinite=config.on_nonfinite,
                workers=self.workers, stop_after_steps=config.stop_after_steps or None)

  @property
  def workers(self) -> int:
    return self.config.data.workers

  @property
  def train_counts(self) -> np.ndarray:
    return self.splits["train"].group_counts()

  def stage_dir(self, name: str) -> str:
    path = os.path.join(self.workdir, name)
    os.makedirs(path, exist_ok=True)
    return path

  def seed(self, *names: str | int) -> int:
    """The run seed folded with `names` (`dett_jax.rng.seed`)."""
    return rng.seed(self.config.seed, *names)

  def key(self, *names: str | int) -> jax.Array:
    return rng.key(self.config.seed, *names)


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


def per_example(ctx: Context, fn: Callable, variables: Tree, split: Split) -> np.ndarray:
  """`fn(variables, inputs)` over every example of `split` (no augmentation), `[n, ...]`.

  Each process loads its slice of every batch; the outputs are gathered, so every
  process returns the whole array (a collective: all processes must call it).
  """
  fn = jax.jit(fn)
  chunks = []
  for batch in eval_batches(split, global_batch_size=ctx.config.eval_batch_size,
                            preprocess=ctx.preprocess, process_index=jax.process_index(),
                            process_count=jax.process_count(), workers=ctx.workers):
    batch = shard_batch({k: v for k, v in batch.items() if k in ("index", "mask", *INPUT_KEYS)},
                        ctx.mesh)
    chunks.append((fn(variables, model_inputs(batch)), batch["index"], batch["mask"]))
  out, index, mask = (np.concatenate(parts) for parts in zip(*distributed.to_host(chunks)))
  keep = mask > 0
  assert keep.sum() == len(split) and np.array_equal(np.sort(index[keep]), np.arange(len(split)))
  result = np.empty((len(split),) + out.shape[1:], out.dtype)
  result[index[keep]] = out[keep]
  return result


def run_stage(ctx: Context, name: str, template: Tree | None, body) -> tuple[Tree | None, dict]:
  """Runs `body() -> (variables, record)` unless the stage is done; loads its outputs if so."""
  stage_dir = ctx.stage_dir(name)
  record = stage_done(stage_dir)
  received = stop_requested()
  if distributed.any_process(received is not None) and record is None:  # all processes agree
    raise Interrupted(f"stopped before stage {name} (signal {received}); re-run the same "
                      "command to resume")
  if record is not None:
    console.stage_loaded(name, record)  # one line (train.py), else an INFO record
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
  console.stage_finished(name, record)  # `stage NAME: 27 s, val worst group 67.8%, ...`
  return variables, record


@dataclasses.dataclass(frozen=True)
class Training:
  """What a stage trains: its data (indices into `split`, example weights), optimizer
  config, named random streams and model selection."""

  split: Split
  optim: Any
  stream: tuple[str, ...]
  index_list: np.ndarray | None = None
  weights: np.ndarray | None = None
  select_metric: str | None = None
  eval_step: Any = None
  cached: dict[str, np.ndarray] | None = None


def schedule(config: ml_collections.ConfigDict, name: str, optim: Any, num_examples: int,
             error: type[Exception] = ValueError) -> tuple[int, int, Any]:
  """(global batch size, steps per epoch, optimizer) of a stage training `num_examples`
  examples per epoch with `optim`; `error` (naming the stage) when no full batch fits."""
  batch_size = optim.batch_size or config.batch_size
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch < 1:
    raise error(f"{name}: {num_examples} training examples give no full batch of "
                f"{batch_size}; lower the batch size")
  return batch_size, steps_per_epoch, make_optimizer(optim, steps_per_epoch, batch_size)


def train_model(ctx: Context, name: str, method: Method, variables: Tree, frozen: Tree,
                training: Training) -> tuple[Tree, dict]:
  """Trains `variables` (`{"params", "collections"}`) with `method.loss`; returns (the
  selected variables, the summary). The data order is `ctx.seed(*stream, "data")`, the
  loss's randomness `ctx.key(*stream, "step")`."""
  config, split, optim = ctx.config, training.split, training.optim
  index_list = np.arange(len(split)) if training.index_list is None else training.index_list
  batch_size, steps_per_epoch, tx = schedule(config, name, optim, len(index_list))
  # Copy: the step donates its state, and `variables` may share buffers with the caller's.
  variables = jax.tree.map(jnp.copy, variables)
  state = ctx.place(TrainState.create(variables["params"], variables["collections"], tx))
  frozen = ctx.place(frozen)
  step_fn = jit_train_step(make_train_step(method, tx, ctx.key(*training.stream, "step")),
                           ctx.mesh, state, frozen)
  seed = ctx.seed(*training.stream, "data")
  data = train_batches(split, index_list, num_epochs=optim.epochs, global_batch_size=batch_size,
                       seed=seed, preprocess=ctx.preprocess,
                       augment_images=optim.augment,
                       weights=training.weights, process_index=jax.process_index(),
                       process_count=jax.process_count(), cached=training.cached)
  evaluate_fn = None
  if training.select_metric is not None:
    evaluate_fn = lambda v: evaluate(ctx, training.eval_step, v, frozen, splits=("val",))
  spec = FitSpec(name=name, stage_dir=ctx.stage_dir(name), num_epochs=optim.epochs,
                 steps_per_epoch=steps_per_epoch, data=data, evaluate=evaluate_fn,
                 select_metric=training.select_metric,
                 tie_metric="val/avg_acc" if training.select_metric else None,
                 signature={"method": method.name, "seed": seed, "batch_size": batch_size,
                            "steps_per_epoch": steps_per_epoch,
                            **{f"optim.{k}": v for k, v in optim.items()
                               if OPTIM_LATER.get(k, object()) != v}},
                 **ctx.fit_options())
  return fit(spec, state, step_fn, frozen, ctx.mesh, ctx.logger)
