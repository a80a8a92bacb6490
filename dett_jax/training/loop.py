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
from absl import logging
from jax.sharding import Mesh

from dett_jax import distributed
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


class CheckpointMismatch(ValueError):
  """A stage checkpoint written by a different config or model; the message names the fields."""


def _now() -> float:
  """Wall-clock seconds for time-based checkpoints (a function, so tests can drive it)."""
  return time.time()


def _variables(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _checkpoint_dir(stage_dir: str) -> str:
  return os.path.abspath(os.path.join(stage_dir, "checkpoints"))


def _manager(spec: FitSpec) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max(1, spec.keep_checkpoints),
                                         enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(_checkpoint_dir(spec.stage_dir), options=options,
                               item_names=("state", "best", "meta"))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _shapes(tree: Any, prefix: str) -> dict[str, str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
          f"{x.dtype}{list(x.shape)}" for path, x in leaves}


def _differing(stored: dict, current: dict) -> str:
  keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
  return "; ".join(f"{k}: {stored.get(k, 'absent')} -> {current.get(k, 'absent')}"
                   for k in keys[:5]) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")


def _set_aside(spec: FitSpec, step: int, reason: str) -> None:
  """Moves a bad checkpoint to `<stage>/corrupt_checkpoints/` (never deletes it)."""
  source = os.path.join(_checkpoint_dir(spec.stage_dir), str(step))
  target_dir = os.path.join(os.path.abspath(spec.stage_dir), "corrupt_checkpoints")
  target = os.path.join(target_dir, f"{step}-{int(time.time())}")
  logging.warning("stage %s: checkpoint %s is unusable (%s); moved to %s, trying an earlier one",
                  spec.name, source, reason, target)
  if distributed.is_primary():
    os.makedirs(target_dir, exist_ok=True)
    os.rename(source, target)
  distributed.sync(f"set aside {spec.name} {step}")


def _restore(spec: FitSpec, manager: ocp.CheckpointManager, state: TrainState, best: Any,
             signature: dict) -> tuple[ocp.CheckpointManager, Any]:
  """(manager, restored items) from the newest checkpoint that reads back intact, or
  (manager, None). Unreadable or corrupted ones (checksum mismatch) are set aside; one
  of a different config raises `CheckpointMismatch`."""
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(_checkpoint_dir(spec.stage_dir), str(step))
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError("no step record")
    except Exception as e:  # noqa: BLE001 -- any read failure means the files are damaged
      reason = f"its meta data cannot be read: {type(e).__name__}: {str(e)[:200]}"
    else:
      differing = _differing(meta.get("signature", signature), signature)
      if differing:
        raise CheckpointMismatch(
            f"checkpoint {path} of stage {spec.name} was written by a different config or "
            f"model ({differing}); use a new --workdir, or move {_checkpoint_dir(spec.stage_dir)} "
            "away to restart this stage")
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)),
            best=ocp.args.StandardRestore(_abstract(best)), meta=ocp.args.JsonRestore()))
        sums = {"state": checksum(restored["state"]), "best": checksum(restored["best"])}
        if "checksums" in meta and sums != meta["checksums"]:
          raise ValueError(f"checksums {sums} differ from the recorded {meta['checksums']}")
        return manager, restored
      except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {str(e)[:300]}"
    manager.close()
    _set_aside(spec, step, reason)
    manager = _manager(spec)
  return manager, None


def _leaf_checksum(x: jnp.ndarray) -> jnp.ndarray:
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  flat = bits.reshape(-1)
  position = jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(flat * position, dtype=jnp.uint32)  # wraps modulo 2**32: order-independent


@jax.jit
def _tree_checksum(tree: Any) -> jnp.ndarray:
  sums = [_leaf_checksum(x) * jnp.uint32(2 * i + 1) for i, x in enumerate(jax.tree.leaves(tree))]
  return jnp.sum(jnp.stack(sums), dtype=jnp.uint32) if sums else jnp.uint32(0)


def checksum(tree: Any) -> int:
  """A 32-bit checksum of every bit of a tree of arrays (any sharding, any process count);
  stored with each checkpoint to detect files that decode but were overwritten."""
  value = _tree_checksum(tree)
  return int(np.asarray(value.addressable_data(0)))


def fit(spec: FitSpec, state: TrainState, train_step: Callable, frozen: Any, mesh: Mesh,
        logger: MetricLogger) -> tuple[dict[str, Any], dict[str, Any]]:
  """Trains `state` with the jitted `train_step`; returns (selected variables, summary).

  The summary holds the history of validation metrics, the selection record and the
  steps skipped as non-finite. Resumes from the stage's newest intact checkpoint.
  """
  if spec.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"on_nonfinite={spec.on_nonfinite!r}; choose stop or skip")
  manager = _manager(spec)
  total_steps = spec.num_epochs * spec.steps_per_epoch
  best = _copy(_variables(state))
  signature = {**{k: str(v) for k, v in spec.signature.items()}, **_shapes(state, "state/")}
  meta = {"step": 0, "history": [], "best_epoch": None, "best_value": None, "skipped_steps": []}
  manager, restored = _restore(spec, manager, state, best, signature)
  distributed.note_progress(stage=spec.name, step=0, total=total_steps)
  if restored is not None:
    state, best, meta = restored["state"], restored["best"], restored["meta"]
    meta.setdefault("skipped_steps", [])
    distributed.note_progress(step=int(meta["step"]), checkpoint=os.path.join(
        _checkpoint_dir(spec.stage_dir), str(int(meta["step"]))))
  last_save = {"time": _now()}

  def save(step: int) -> None:
    meta["step"], meta["signature"] = step, signature
    meta["checksums"] = {"state": checksum(state), "best": checksum(best)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        meta=ocp.args.JsonSave(meta)), force=True)
    last_save["time"] = _now()
    distributed.note_progress(checkpoint=os.path.join(_checkpoint_dir(spec.stage_dir), str(step)))

  def last_good() -> str:
    manager.wait_until_finished()
    latest = manager.latest_step()
    return (os.path.join(_checkpoint_dir(spec.stage_dir), str(latest)) if latest is not None
            else f"none yet (stage {spec.name} would start over)")

  def flush(pending: list) -> None:
    """Logs the pending steps' mean metrics; stops or counts non-finite steps."""
    host = jax.device_get([m for _, m in pending])
    if spec.host_metrics is not None:
      host = [spec.host_metrics(m) for m in host]
    bad = lambda m: bool(np.any(m["nonfinite_loss"]) or np.any(m["nonfinite_grad"]))
    for (index, _), m in zip(pending, host):  # metrics may be [k] (stacked sweep variants)
      if bad(m):
        what = ("loss" if np.any(m["nonfinite_loss"]) else "gradient") + (
            f" (loss={m['loss']}, grad_norm={m['grad_norm']})")
        if spec.on_nonfinite == "stop":
          raise Diverged(f"stage {spec.name}: non-finite {what} at step {index + 1} of "
                         f"{total_steps}; the update was not applied. Last good checkpoint: "
                         f"{last_good()}. Lower the learning rate or check the data, or set "
                         "on_nonfinite=skip to skip such steps")
        meta["skipped_steps"].append(index + 1)
        logging.warning("stage %s: step %d skipped: non-finite %s", spec.name, index + 1, what)
    finite = [m for m in host if not bad(m)] or host
    mean = {k: float(np.mean([m[k] for m in finite])) for k in host[0]
            if not k.startswith("nonfinite_")}
    mean["steps_per_sec"] = len(host) / max(time.time() - clock["start"], 1e-9)
    mean["skipped_steps"] = float(len(meta["skipped_steps"]))
    clock["start"] = time.time()
    logger.write(spec.name, pending[-1][0] + 1, mean)
    bar.set_postfix(loss=f"{mean['loss']:.4f}")

  step = int(meta["step"])
  saved_step = step if restored is not None else None
  stop_at = total_steps if spec.stop_after_steps is None else min(total_steps, step + spec.stop_after_steps)
  bar = tqdm.tqdm(total=total_steps, initial=step, desc=spec.name, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
  pending: list[tuple[int, dict]] = []
  batches = iterate(spec.data, start=step, workers=spec.workers)
  clock = {"start": time.time()}
  several = jax.process_count() > 1
  stopping = False
  try:
    with StopSignals() as signals:
      while step < stop_at and not stopping:
        batch = shard_batch(next(batches), mesh)
        state, metrics = train_step(state, batch, frozen)
        pending.append((step, metrics))
        step += 1
        distributed.note_progress(step=step)
        bar.update(1)
        epoch_end = step % spec.steps_per_epoch == 0
        periodic = bool(spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0)
        sync_point = step % spec.log_every_steps == 0 or step == stop_at or epoch_end or periodic
        if sync_point:
          flush(pending)
          pending = []
          if spec.checkpoint_every_minutes and not periodic:  # every process decides alike
            due = _now() - last_save["time"] >= 60 * spec.checkpoint_every_minutes
            periodic = distributed.any_process(due) if several else due
        if epoch_end:
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
        if epoch_end or periodic:
          saved_step = step
          save(step)
        # A signal stops the loop after this step; with several processes they agree at
        # the next sync point, so all stop at the same step.
        if several:
          stopping = sync_point and distributed.any_process(signals.received is not None)
        else:
          stopping = signals.received is not None
      if pending:
        flush(pending)
        pending = []
      if step < total_steps and saved_step != step:  # stopped early: keep this exact point
        save(step)
  finally:  # stop the worker processes also on an error; finish writing checkpoints
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
      "value": meta["best_value"]}, "skipped_steps": meta["skipped_steps"]}
  return best, summary


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
