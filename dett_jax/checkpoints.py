"""Stage outputs on disk: final variables (Orbax) and a `done.json` completion marker."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dett_jax.report import write_json_atomic


def save_variables(path: str, tree: Any) -> None:
  """Saves a pytree of arrays with Orbax (replacing what was there)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def load_variables(path: str, template: Any) -> Any:
  """Restores a pytree saved by `save_variables` onto the shardings of `template`.

  Raises ValueError naming the path when the stored tree does not fit the template
  (e.g. a checkpoint of another architecture).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
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
  """Marks a stage finished (written last, atomically, after its outputs)."""
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(stage_dir, "done.json"), record)
