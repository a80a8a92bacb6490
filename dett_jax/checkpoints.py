"""Checkpoints on disk: stage outputs (final variables and a `done.json` marker) and the
checkpoints a training stage resumes from (`StageCheckpoints`).

In a multi-process run every process calls `save_variables` / `load_variables` (each
writes or reads its own shards, Orbax synchronises them; the directory must be on a
file system all processes share); only process 0 writes `done.json`.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dett_jax import distributed
from dett_jax.io import read_json, write_json_atomic


def save_variables(path: str, tree: Any) -> None:
  """Saves a pytree of arrays (e.g. Flax variables) as an Orbax checkpoint directory.

  Replaces what was at `path`. With several processes, all must call it with the same
  global arrays. The bundled trainer saves each stage's model this way (e.g.
  `<workdir>/teacher_erm/final`).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from dett_jax import load_variables, save_variables
    >>> directory = tempfile.TemporaryDirectory()              # removed when collected
    >>> path = os.path.join(directory.name, "head")
    >>> save_variables(path, {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)})
    >>> load_variables(path)["kernel"].shape
    (4, 2)
  """
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def load_variables(path: str, template: Any = None) -> Any:
  """Restores a pytree saved by `save_variables` (e.g. a teacher saved by `train.py`).

  Args:
    path: the checkpoint directory.
    template: a pytree of arrays (or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`)
      of the expected structure; the result gets its shapes checked and its leaves'
      shardings (the default device for leaves without one), whatever devices wrote it.
      None: the stored tree as numpy arrays on the host.

  Returns:
    The restored pytree.

  Raises:
    FileNotFoundError: no checkpoint directory at `path`.
    ValueError: the stored tree does not fit `template` (e.g. another architecture).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from dett_jax import load_variables, save_variables
    >>> directory = tempfile.TemporaryDirectory()              # removed when collected
    >>> path = os.path.join(directory.name, "teacher")
    >>> save_variables(path, {"params": {"w": jnp.arange(3.0)}})
    >>> load_variables(path, template={"params": {"w": jnp.zeros(3)}})["params"]["w"]
    Array([0., 1., 2.], dtype=float32)
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if template is None:
    return _restore_numpy(path)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # for leaves without one
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                     sharding=getattr(x, "sharding", None) or default), template)
  try:
    return ocp.StandardCheckpointer().restore(path, abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint {path} does not fit the configured model: {e}") from None


def stage_done(stage_dir: str) -> dict | None:
  """The stage's recorded outputs if it finished, else None."""
  return read_json(os.path.join(stage_dir, "done.json"))


def mark_done(stage_dir: str, record: dict) -> None:
  """Marks a stage finished (written last, atomically, after its outputs). Process 0
  writes it; the others wait until it is there, so every process agrees the stage is done."""
  if distributed.is_primary():
    write_json_atomic(os.path.join(stage_dir, "done.json"), record)
  distributed.sync(f"done {os.path.basename(os.path.normpath(stage_dir))}")


def load_backbone(path: str, template: Any) -> Any:
  """`template` (ResNet variables) with every leaf but the head taken from the checkpoint at
  `path`, e.g. ImageNet weights imported by `python -m dett_jax.import_torch`.

  The stored head (of any class count) is ignored. Raises ValueError listing the
  parameters whose names or shapes differ from the template's.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  stored = _restore_numpy(path)
  want = _backbone_leaves(template)
  have = _backbone_leaves(stored)
  problems = [f"{k} missing" for k in want if k not in have]
  problems += [f"{k} has shape {tuple(have[k].shape)}, the model needs {tuple(want[k].shape)}"
               for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
  problems += [f"{k} is not in the model" for k in have if k not in want]
  if problems:
    raise ValueError(f"checkpoint {path} does not fit the configured backbone ({len(problems)} "
                     f"problem(s): {'; '.join(problems[:5])}); check depth, width and stem")
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: leaf if _name(p) not in have else jax.numpy.asarray(have[_name(p)], leaf.dtype),
      template)


def _restore_numpy(path: str) -> Any:
  """The checkpoint at `path` as numpy arrays on the host, whatever devices (and number of
  processes) wrote it; every process reads the whole tree."""
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  if metadata is None:
    raise ValueError(f"checkpoint {path} has no tree metadata; save it with save_variables")
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _name(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _backbone_leaves(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      {c: tree.get(c, {}) for c in ("params", "batch_stats")})[0]
  return {_name(p): leaf for p, leaf in leaves if not _name(p).startswith("params/head/")}


# ---------------------------------------------------------------------------
# A training stage's checkpoints: Orbax items "state", "best" and "meta" (a JSON dict
# holding the checksums of the other two) under <stage_dir>/checkpoints/<step>.
# ---------------------------------------------------------------------------

# What Orbax names a checkpoint while writing it ("<name>.orbax-checkpoint-tmp", with
# "-<timestamp>" in older versions); it renames it to "<name>" once every file is there.
_PARTIAL = re.compile(r".+\.orbax-checkpoint-tmp(-\d+)?")


class CheckpointMismatch(ValueError):
  """A stage checkpoint written by a different config or model; the message names the fields."""


class StageCheckpoints:
  """The checkpoints of stage `name` under `<stage_dir>/checkpoints`, the newest `keep`
  kept. Saves are asynchronous: `wait` (or `close`) before relying on them. Opening it
  deletes what saves killed mid-write left in the stage (never a finished checkpoint).
  """

  def __init__(self, stage_dir: str, name: str, keep: int):
    self.stage_dir, self.name, self.keep = os.path.abspath(stage_dir), name, max(1, keep)
    self.directory = _checkpoint_dir(stage_dir)
    _remove_partial(name, (self.directory, self.stage_dir))
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=("state", "best", "meta"))

  def path(self, step: int) -> str:
    """The directory of checkpoint `step`."""
    return os.path.join(self.directory, str(step))

  def restore(self, state: Any, best: Any, signature: dict[str, str]) -> dict[str, Any] | None:
    """The items ("state", "best", "meta") of the newest checkpoint that reads back intact,
    or None. `state` and `best` give the trees' structure, shapes and shardings. Unreadable
    or corrupted ones (checksum mismatch) are set aside; one whose `signature` differs
    raises `CheckpointMismatch`."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, reason = self._read(step, state, best, signature)
      if restored is not None:
        return restored
      self._manager.close()
      self._set_aside(step, reason)
      self._manager = self._open()
    return None

  def _read(self, step: int, state: Any, best: Any,
            signature: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    """(items, "") when checkpoint `step` is intact, else (None, what is wrong with it)."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError("no step record")
    except Exception as e:  # noqa: BLE001 -- any read failure means the files are damaged
      return None, f"its meta data cannot be read: {type(e).__name__}: {str(e)[:200]}"
    differing = _differing(meta.get("signature", signature), signature)
    if differing:
      raise CheckpointMismatch(
          f"checkpoint {self.path(step)} of stage {self.name} was written by a different config "
          f"or model ({differing}); use a new --workdir, or move {self.directory} "
          "away to restart this stage")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state)),
          best=ocp.args.StandardRestore(_abstract(best)), meta=ocp.args.JsonRestore()))
      sums = {"state": checksum(restored["state"]), "best": checksum(restored["best"])}
      if "checksums" in meta and sums != meta["checksums"]:
        raise ValueError(f"checksums {sums} differ from the recorded {meta['checksums']}")
      return restored, ""
    except Exception as e:  # noqa: BLE001
      return None, f"{type(e).__name__}: {str(e)[:300]}"

  def _set_aside(self, step: int, reason: str) -> None:
    """Moves a bad checkpoint to `<stage>/corrupt_checkpoints/` (never deletes it)."""
    source = self.path(step)
    target_dir = os.path.join(self.stage_dir, "corrupt_checkpoints")
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    logging.warning("stage %s: checkpoint %s is unusable (%s); moved to %s, trying an earlier one",
                    self.name, source, reason, target)
    if distributed.is_primary():
      os.makedirs(target_dir, exist_ok=True)
      os.rename(source, target)
    distributed.sync(f"set aside {self.name} {step}")

  def save(self, step: int, state: Any, best: Any, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step`: `state`, `best` and a copy of `meta` with their
    checksums added (under "checksums")."""
    meta = copy.deepcopy(meta)  # written in the background: later changes must not show
    meta["checksums"] = {"state": checksum(state), "best": checksum(best)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        meta=ocp.args.JsonSave(meta)), force=True)

  def latest(self) -> str | None:
    """The newest checkpoint's directory once pending saves are written; None: none."""
    self.wait()
    step = self._manager.latest_step()
    return None if step is None else self.path(step)

  def wait(self) -> None:
    """Blocks until every started save is written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def stage_signature(values: dict[str, Any], state: Any) -> dict[str, str]:
  """What a stage checkpoint must have been written with: `values` (config fields, as
  strings) and the dtype and shape of every leaf of `state` (as "state/<path>")."""
  return {**{k: str(v) for k, v in values.items()}, **_shapes(state, "state/")}


def _checkpoint_dir(stage_dir: str) -> str:
  return os.path.abspath(os.path.join(stage_dir, "checkpoints"))


def _remove_partial(stage: str, directories: Sequence[str]) -> None:
  """Deletes the checkpoint directories that saves killed mid-write left in `directories`
  (Orbax's temporary names; a finished checkpoint never has one). The primary process
  deletes; the others wait for it."""
  if distributed.is_primary():
    for directory in directories:
      entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
      for entry in entries:
        path = os.path.join(directory, entry)
        if _PARTIAL.fullmatch(entry) and os.path.isdir(path):
          logging.warning("stage %s: removing %s, a checkpoint left half-written by an "
                          "interrupted save", stage, path)
          shutil.rmtree(path)
  distributed.sync(f"partial checkpoints {stage}")


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
