"""The training loop shared by every stage: epochs, evaluation, selection, checkpoints.

A stage's progress lives in an Orbax `CheckpointManager` under `<stage_dir>/checkpoints`
with three items: `state` (trained parameters and optimizer state), `best` (the
variables selected so far) and `meta` (step, history, selection). The step number
fixes the position in the data (epoch = step // steps_per_epoch), so resuming
continues mid-epoch with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import Mesh

from dett_jax.data.pipeline import iterate
from dett_jax.sharding import shard_batch
from dett_jax.training.steps import TrainState


class MetricLogger:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._writers = {}

  def write(self, stage: str, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")
    if stage not in self._writers:
      from tensorboardX import SummaryWriter  # imported lazily: only needed when logging
      self._writers[stage] = SummaryWriter(os.path.join(self.workdir, "tensorboard", stage))
    for k, v in metrics.items():
      self._writers[stage].add_scalar(k, float(v), int(step))

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers = {}


@dataclasses.dataclass
class FitSpec:
  """What one training stage runs.

  data: every batch of the stage (this process's part), `num_epochs * steps_per_epoch`
    of them, as a random-access `grain.MapDataset` (see `data.pipeline.train_batches`).
  workers: worker processes that load batches ahead (0: load in this process).
  evaluate: variables -> validation metrics (None: no evaluation during training).
  select_metric: metric maximised for model selection; None keeps the last epoch.
  """

  name: str
  stage_dir: str
  num_epochs: int
  steps_per_epoch: int
  data: grain.MapDataset
  evaluate: Callable[[Any], dict[str, float]] | None = None
  select_metric: str | None = None
  log_every_steps: int = 20
  checkpoint_every_steps: int = 0
  workers: int = 0
  stop_after_steps: int | None = None  # stop (as if preempted) after this many steps; None: run on


def _variables(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _manager(stage_dir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(stage_dir, "checkpoints")),
                               options=options, item_names=("state", "best", "meta"))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def fit(spec: FitSpec, state: TrainState, train_step: Callable, frozen: Any, mesh: Mesh,
        logger: MetricLogger) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains `state` with the jitted `train_step`; returns (selected variables, summary).

  The summary holds the history of validation metrics and the selection record.
  Resumes from the stage's latest checkpoint when there is one.
  """
  manager = _manager(spec.stage_dir)
  total_steps = spec.num_epochs * spec.steps_per_epoch
  best = _copy(_variables(state))
  meta = {"step": 0, "history": [], "best_epoch": None, "best_value": None}
  latest = manager.latest_step()
  if latest is not None:
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state)),
        best=ocp.args.StandardRestore(_abstract(best)),
        meta=ocp.args.JsonRestore()))
    state, best, meta = restored["state"], restored["best"], restored["meta"]

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        meta=ocp.args.JsonSave(meta)), force=True)

  step = int(meta["step"])
  saved_step = step if latest is not None else None
  stop_at = total_steps if spec.stop_after_steps is None else min(total_steps, step + spec.stop_after_steps)
  bar = tqdm.tqdm(total=total_steps, initial=step, desc=spec.name, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
  pending: list[dict] = []
  batches = iterate(spec.data, start=step, workers=spec.workers)
  start = time.time()
  try:
    with StopSignals() as signals:
      while step < stop_at and signals.received is None:
        batch = shard_batch(next(batches), mesh)
        state, metrics = train_step(state, batch, frozen)
        pending.append(metrics)
        step += 1
        bar.update(1)
        if step % spec.log_every_steps == 0 or step == stop_at:
          host = jax.device_get(pending)
          mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
          mean["steps_per_sec"] = len(host) / max(time.time() - start, 1e-9)
          start, pending = time.time(), []
          logger.write(spec.name, step, mean)
          bar.set_postfix(loss=f"{mean['loss']:.4f}")
        if step % spec.steps_per_epoch == 0:
          epoch_done = step // spec.steps_per_epoch
          record = {"epoch": epoch_done, "step": step}
          if spec.evaluate is not None:
            record.update(spec.evaluate(_variables(state)))
            logger.write(spec.name, step, {k: v for k, v in record.items() if "/" in k})
          meta["history"].append(record)
          value = record.get(spec.select_metric) if spec.select_metric else None
          if spec.select_metric is None or meta["best_value"] is None or (
              value is not None and value > meta["best_value"]):
            best, meta["best_epoch"], meta["best_value"] = _copy(_variables(state)), epoch_done, value
        if step % spec.steps_per_epoch == 0 or (
            spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0):
          meta["step"] = saved_step = step
          save(step)
      if step < total_steps and saved_step != step:  # stopped early: keep this exact point
        meta["step"] = step
        save(step)
  finally:  # stop the worker processes also on an error
    batches.close()
  bar.close()
  manager.wait_until_finished()
  manager.close()
  if step < total_steps:
    cause = f"signal {signals.received}" if signals.received is not None else "stop_after_steps"
    raise Interrupted(f"stage {spec.name} stopped at step {step} of {total_steps} ({cause}); "
                      "re-run the same command to resume")
  summary = {"history": meta["history"], "selection": {
      "metric": spec.select_metric or "last_epoch", "epoch": meta["best_epoch"],
      "value": meta["best_value"]}}
  return best, summary


class Interrupted(RuntimeError):
  """Raised when a stage stops before its last step (SIGTERM/SIGINT or `stop_after_steps`),
  after checkpointing that step; re-running the same command resumes from it."""


class StopSignals:
  """While active, SIGTERM and SIGINT only set `received`: the loop finishes the
  current step, checkpoints it and stops. Outside the main thread it does nothing."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
