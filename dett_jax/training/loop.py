"""The training loop shared by every stage: epochs, evaluation, selection, checkpoints.

A stage's progress lives in its `checkpoints.StageCheckpoints` (Orbax, under
`<stage_dir>/checkpoints`) with three items: `state` (trained parameters and optimizer state), `best` (the
variables selected so far) and `meta` (step, history, selection). The step number
fixes the position in the data (epoch = step // steps_per_epoch), so resuming
continues mid-epoch with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh

from dett_jax import distributed
from dett_jax.checkpoints import StageCheckpoints, stage_signature
from dett_jax.data.pipeline import iterate
from dett_jax.sharding import shard_batch
from dett_jax.training.state import TrainState


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
  tie_metric: decides between epochs equal in `select_metric` (None: the earlier one).
  checkpoint_every_steps / checkpoint_every_minutes: periodic checkpoints besides the one
    at each epoch's end (0: none). keep_checkpoints: how many recent ones are kept; each
    also holds the best variables so far (by `select_metric`).
  on_nonfinite: "stop" (raise `Diverged`) or "skip" (count the step and go on) when a
    step's loss or gradient is not finite; such a step never changes the state.
  signature: config values a checkpoint of this stage must have been written with
    (besides the state's parameter shapes); a different one is refused.
  host_metrics: turns what the train step returns as metrics, fetched to the host, into
    the metrics dict (e.g. `training.looped`'s rows); None: they are that dict.
  """

  name: str
  stage_dir: str
  num_epochs: int
  steps_per_epoch: int
  data: grain.MapDataset
  evaluate: Callable[[Any], dict[str, float]] | None = None
  select_metric: str | None = None
  tie_metric: str | None = None
  log_every_steps: int = 20
  checkpoint_every_steps: int = 0
  checkpoint_every_minutes: float = 0.0
  keep_checkpoints: int = 2
  on_nonfinite: str = "stop"
  signature: dict = dataclasses.field(default_factory=dict)
  workers: int = 0
  stop_after_steps: int | None = None  # stop (as if preempted) after this many steps; None: run on
  host_metrics: Callable[[Any], dict] | None = None  # a step's metrics, on the host -> dict


class Interrupted(RuntimeError):
  """Raised when a stage stops before its last step (SIGTERM/SIGINT or `stop_after_steps`),
  after checkpointing that step; re-running the same command resumes from it."""


class Diverged(RuntimeError):
  """Raised when a step's loss or gradient is not finite (with `on_nonfinite="stop"`); the
  message names the stage, the step, the metric and the last good checkpoint."""


def _now() -> float:
  """Wall-clock seconds for time-based checkpoints (a function, so tests can drive it)."""
  return time.time()


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class _Stage:
  """What stays fixed while a stage trains."""

  spec: FitSpec
  checkpoints: StageCheckpoints
  logger: MetricLogger
  bar: tqdm.tqdm
  signature: dict[str, str]
  total_steps: int
  stop_at: int  # the step this run stops at (total_steps, or earlier by stop_after_steps)
  several: bool  # more than one process: decisions are agreed on at sync points


@dataclasses.dataclass
class _Progress:
  """A stage's mutable progress: what its checkpoints hold, and what is not logged yet.

  meta: step, history (one record per epoch), best_epoch, best_value, skipped_steps
    (and, once saved, the signature): the checkpoint's "meta" item.
  pending: (0-based step, device metrics) of the steps since the last sync point.
  """

  state: TrainState
  best: Any  # the variables selected so far
  meta: dict[str, Any]
  step: int
  saved_step: int | None  # the step of the newest checkpoint (None: none yet)
  last_save: float  # `_now()` at the newest save (or the start)
  window_start: float = dataclasses.field(default_factory=time.time)  # for steps_per_sec
  pending: list[tuple[int, Any]] = dataclasses.field(default_factory=list)


def _resume(spec: FitSpec, checkpoints: StageCheckpoints, state: TrainState,
            signature: dict[str, str]) -> _Progress:
  """The progress from the stage's newest intact checkpoint, or a fresh start."""
  best = _copy(state.variables)
  meta = dict(step=0, history=[], best_epoch=None, best_value=None, best_tie=None, skipped_steps=[])
  restored = checkpoints.restore(state, best, signature)
  distributed.note_progress(stage=spec.name, step=0, total=spec.num_epochs * spec.steps_per_epoch)
  if restored is not None:
    state, best, meta = restored["state"], restored["best"], restored["meta"]
    meta.setdefault("skipped_steps", [])
    distributed.note_progress(step=int(meta["step"]),
                              checkpoint=checkpoints.path(int(meta["step"])))
  step = int(meta["step"])
  return _Progress(state=state, best=best, meta=meta, step=step,
                   saved_step=step if restored is not None else None, last_save=_now())


def _save(stage: _Stage, run: _Progress) -> None:
  """Starts writing a checkpoint of the current step."""
  run.meta["step"], run.meta["signature"] = run.step, stage.signature
  stage.checkpoints.save(run.step, run.state, run.best, run.meta)
  run.saved_step, run.last_save = run.step, _now()
  distributed.note_progress(checkpoint=stage.checkpoints.path(run.step))


def _nonfinite(metrics: dict[str, Any]) -> bool:
  return bool(np.any(metrics["nonfinite_loss"]) or np.any(metrics["nonfinite_grad"]))


def _on_nonfinite(stage: _Stage, run: _Progress, step: int, metrics: dict[str, Any]) -> None:
  """Raises `Diverged` for the non-finite (1-based) `step`, or records it as skipped."""
  spec = stage.spec
  what = ("loss" if np.any(metrics["nonfinite_loss"]) else "gradient") + (
      f" (loss={metrics['loss']}, grad_norm={metrics['grad_norm']})")
  if spec.on_nonfinite == "stop":
    last_good = stage.checkpoints.latest() or f"none yet (stage {spec.name} would start over)"
    raise Diverged(f"stage {spec.name}: non-finite {what} at step {step} of "
                   f"{stage.total_steps}; the update was not applied. Last good checkpoint: "
                   f"{last_good}. Lower the learning rate or check the data, or set "
                   "on_nonfinite=skip to skip such steps")
  run.meta["skipped_steps"].append(step)
  logging.warning("stage %s: step %d skipped: non-finite %s", spec.name, step, what)


def _per_variant(host: list[dict[str, Any]], step: int, steps_per_epoch: int
                 ) -> dict[str, float]:
  """For stacked sweep variants (metrics `[k]`): each variant's mean loss over its finite
  steps of the window (`loss/variant_<i>`) and the window's (1-based) `epoch`, for
  `dett_jax.curves`; {} for a single model (scalar metrics), whose records stay as they were."""
  losses = np.stack([np.asarray(m["loss"], np.float64) for m in host])  # [steps, k]
  if losses.ndim != 2:
    return {}
  bad = np.stack([np.broadcast_to((np.asarray(m["nonfinite_loss"]) != 0)
                                  | (np.asarray(m["nonfinite_grad"]) != 0), losses.shape[1:])
                  for m in host])  # the flags are 0.0 / 1.0
  out = {}
  for i in range(losses.shape[1]):
    kept = losses[~bad[:, i], i]
    out[f"loss/variant_{i}"] = float(np.mean(kept if kept.size else losses[:, i]))
  out["epoch"] = float(-(-step // steps_per_epoch))
  return out


def _flush(stage: _Stage, run: _Progress) -> None:
  """Logs the pending steps' mean metrics; stops at or counts non-finite steps."""
  spec = stage.spec
  host = jax.device_get([m for _, m in run.pending])
  if spec.host_metrics is not None:
    host = [spec.host_metrics(m) for m in host]
  for (index, _), m in zip(run.pending, host):  # metrics may be [k] (stacked sweep variants)
    if _nonfinite(m):
      _on_nonfinite(stage, run, index + 1, m)
  finite = [m for m in host if not _nonfinite(m)] or host
  mean = {k: float(np.mean([m[k] for m in finite])) for k in host[0]
          if not k.startswith("nonfinite_")}
  mean["steps_per_sec"] = len(host) / max(time.time() - run.window_start, 1e-9)
  mean["skipped_steps"] = float(len(run.meta["skipped_steps"]))
  mean.update(_per_variant(host, run.pending[-1][0] + 1, spec.steps_per_epoch))
  run.window_start = time.time()
  stage.logger.write(spec.name, run.pending[-1][0] + 1, mean)
  stage.bar.set_postfix(loss=f"{mean['loss']:.4f}")
  run.pending = []


def _end_epoch(stage: _Stage, run: _Progress) -> None:
  """Evaluates the epoch just finished, records it and updates the selection."""
  spec, meta = stage.spec, run.meta
  epoch = run.step // spec.steps_per_epoch
  record = {"epoch": epoch, "step": run.step}
  if spec.evaluate is not None:
    record.update(spec.evaluate(run.state.variables))
    stage.logger.write(spec.name, run.step, {k: v for k, v in record.items() if "/" in k})
  meta["history"].append(record)
  value = record.get(spec.select_metric) if spec.select_metric else None
  tie, best_tie = record.get(spec.tie_metric or ""), meta.get("best_tie")  # older: none
  if spec.select_metric is None or meta["best_value"] is None or (value is not None and (
      value > meta["best_value"] or (value == meta["best_value"] and None not in (tie, best_tie)
                                     and tie > best_tie))):
    run.best, meta["best_epoch"], meta["best_value"] = _copy(run.state.variables), epoch, value
    meta["best_tie"] = tie


def _minutes_due(stage: _Stage, run: _Progress) -> bool:
  """Whether a time-based checkpoint is due (every process decides alike)."""
  if not stage.spec.checkpoint_every_minutes:
    return False
  due = _now() - run.last_save >= 60 * stage.spec.checkpoint_every_minutes
  return distributed.any_process(due) if stage.several else due


def _should_stop(stage: _Stage, sync_point: bool, signals: StopSignals) -> bool:
  """Whether a signal stops the loop after this step; with several processes they agree
  at the next sync point, so all stop at the same step."""
  if stage.several:
    return sync_point and distributed.any_process(signals.received is not None)
  return signals.received is not None


def _after_step(stage: _Stage, run: _Progress, signals: StopSignals) -> bool:
  """The periodic actions after a step (log, evaluate and select, checkpoint); returns
  whether to stop."""
  spec, step = stage.spec, run.step
  epoch_end = step % spec.steps_per_epoch == 0
  periodic = bool(spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0)
  sync_point = step % spec.log_every_steps == 0 or step == stage.stop_at or epoch_end or periodic
  if sync_point:
    _flush(stage, run)
    periodic = periodic or _minutes_due(stage, run)
  if epoch_end:
    _end_epoch(stage, run)
  if epoch_end or periodic:
    _save(stage, run)
  return _should_stop(stage, sync_point, signals)


def _train(stage: _Stage, run: _Progress, batches: Iterator, train_step: Callable,
           frozen: Any, mesh: Mesh, signals: StopSignals) -> None:
  """Runs steps until `stage.stop_at` or a stop signal; an early stop is checkpointed at
  its exact step."""
  stopping = False
  while run.step < stage.stop_at and not stopping:
    batch = shard_batch(next(batches), mesh)
    run.state, metrics = train_step(run.state, batch, frozen)
    run.pending.append((run.step, metrics))
    run.step += 1
    distributed.note_progress(step=run.step)
    stage.bar.update(1)
    stopping = _after_step(stage, run, signals)
  if run.pending:
    _flush(stage, run)
  if run.step < stage.total_steps and run.saved_step != run.step:
    _save(stage, run)


def _summary(spec: FitSpec, meta: dict[str, Any]) -> dict[str, Any]:
  return {"history": meta["history"], "selection": {
      "metric": spec.select_metric or "last_epoch", "epoch": meta["best_epoch"],
      "value": meta["best_value"]}, "skipped_steps": meta["skipped_steps"]}


def _bar_options() -> dict[str, Any]:
  """On a terminal, a bar vanishes when its stage ends (the stage's one line replaces it);
  into a file or pipe, it redraws every 5 s and stays as one finished line, so that logs
  hold few redraws and no blank lines where bars were cleared."""
  interactive = sys.stderr is not None and sys.stderr.isatty()
  return {"leave": False} if interactive else {"leave": True, "mininterval": 5.0}


def fit(spec: FitSpec, state: TrainState, train_step: Callable, frozen: Any, mesh: Mesh,
        logger: MetricLogger) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains `state` with the jitted `train_step`; returns (selected variables, summary).

  The summary holds the history of validation metrics, the selection record and the
  steps skipped as non-finite. Resumes from the stage's newest intact checkpoint.
  """
  if spec.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"on_nonfinite={spec.on_nonfinite!r}; choose stop or skip")
  checkpoints = StageCheckpoints(spec.stage_dir, spec.name, spec.keep_checkpoints)
  signature = stage_signature(spec.signature, state)
  run = _resume(spec, checkpoints, state, signature)
  total_steps = spec.num_epochs * spec.steps_per_epoch
  stop_at = total_steps if spec.stop_after_steps is None else min(
      total_steps, run.step + spec.stop_after_steps)
  bar = tqdm.tqdm(total=total_steps, initial=run.step, desc=spec.name, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, **_bar_options())
  stage = _Stage(spec=spec, checkpoints=checkpoints, logger=logger, bar=bar, signature=signature,
                 total_steps=total_steps, stop_at=stop_at, several=jax.process_count() > 1)
  batches = iterate(spec.data, start=run.step, workers=spec.workers)
  run.window_start = time.time()
  try:
    with StopSignals() as signals:
      _train(stage, run, batches, train_step, frozen, mesh, signals)
  finally:  # stop the worker processes also on an error; finish writing checkpoints
    batches.close()
    bar.close()
    checkpoints.wait()
    checkpoints.close()
  if run.step < total_steps:
    cause = f"signal {signals.received}" if signals.received is not None else "stop_after_steps"
    raise Interrupted(f"stage {spec.name} stopped at step {run.step} of {total_steps} ({cause}); "
                      "re-run the same command to resume")
  return run.best, _summary(spec, run.meta)


class StopSignals:
  """While active, SIGTERM and SIGINT only record the signal: a training loop finishes the
  current step, checkpoints it and stops; between stages, the next stage does not start
  (see `stop_requested`). Nested uses share one record; the outermost installs the
  handlers and restores the previous ones. Outside the main thread it does nothing."""

  _depth = 0
  _received: int | None = None

  def __init__(self):
    self._previous = {}
    self._active = False

  @staticmethod
  def _handle(signum, frame):
    del frame
    StopSignals._received = signum

  @property
  def received(self) -> int | None:
    return StopSignals._received if self._active else None

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      self._active = True
      if StopSignals._depth == 0:
        StopSignals._received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._previous[sig] = signal.signal(sig, StopSignals._handle)
      StopSignals._depth += 1
    return self

  def __exit__(self, *exc) -> None:
    if self._active:
      StopSignals._depth -= 1
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)


def stop_requested() -> int | None:
  """The SIGTERM/SIGINT received while a `StopSignals` is active (None: none)."""
  return StopSignals._received if StopSignals._depth else None
