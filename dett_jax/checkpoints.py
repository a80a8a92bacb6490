"""Stage outputs on disk: final variables (Orbax) and a `done.json` completion marker.

In a multi-process run every process calls `save_variables` / `load_variables` (each
writes or reads its own shards, Orbax synchronises them; the directory must be on a
file system all processes share); only process 0 writes `done.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dett_jax import distributed
from dett_jax.report import write_json_atomic


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
  path = os.path.join(stage_dir, "done.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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
