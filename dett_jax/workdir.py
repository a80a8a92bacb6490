"""The workdir guard, run before any compute: a workdir that cannot hold the run's files,
or that holds results of another config, is refused naming the fix."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from dett_jax import distributed
from dett_jax.config_schema import ConfigError, complete
from dett_jax.io import write_json_atomic

# Fields that change how a run is watched or where it computes, not what it computes: a
# workdir may be re-run with other values of these (and with more or fewer student methods
# or debiased teachers: each is its own stage). The whole mesh group is placement only:
# `mesh.cpu_devices` (the number of CPU devices), `mesh.data` / `mesh.model` (the mesh's
# shape) and `mesh.strategy` / `mesh.rules` (how parameters are sharded over it) decide
# which device holds which part of the same global arrays; the global batch, the data
# order and the checkpoints' shapes do not depend on them, and a checkpoint restores under
# any mesh (tests/test_scale.py). Results may differ by float rounding (another reduction
# order), as with another number of processes.
NON_RESULT_FIELDS = ("log_every_steps", "checkpoint_every_steps", "stop_after_steps",
                     "checkpoint_every_minutes", "keep_checkpoints", "on_nonfinite", "min_free_mb",
                     "sweep.axes", "sweep.subset", "sweep.stack", "sweep.mesh_axis", "sweep.conv",
                     "sweep.execution",
                     "mesh.cpu_devices", "mesh.data", "mesh.model", "mesh.strategy", "mesh.rules",
                     "distill.methods", "teacher.debias", "eval_batch_size", "data.workers",
                     "data.check_images")


class WorkdirError(OSError):
  """The workdir cannot be created or written, or its disk is (nearly) full."""


def check_workdir_writable(workdir: str, min_free_mb: float) -> None:
  """Fails early, naming the path and the fix, when `workdir` cannot hold the run's files:
  it cannot be created, a file cannot be written in it, or its disk has less than
  `min_free_mb` MB free. Writes nothing but a probe file it removes again."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}; choose a writable "
                       "--workdir") from None
  probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}; fix its "
                       "permissions or free space, or choose another --workdir") from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)
  free_mb = shutil.disk_usage(workdir).free / 2**20
  if free_mb < min_free_mb:
    raise WorkdirError(f"workdir {workdir} has {free_mb:.0f} MB free, less than min_free_mb="
                       f"{min_free_mb:g}; free some space or choose another --workdir")


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds results of a different config; records the config otherwise.

  With several processes, process 0 writes `config.json` and the others wait for it,
  then check that their config is the same as process 0's. Both configs are compared
  completed (`config_schema.complete`): a field the schema added since the stored config
  was written counts as its default there, and `config.json` records the completed config.
  """
  config = complete(config)
  path = os.path.join(workdir, "config.json")
  current = {k: v for k, v in _flatten(json.loads(config.to_json())).items()
             if not _non_result(k)}
  stored = _stored_config(path)
  if stored is not None:
    differing = _differing(stored, current)
    if differing:
      raise ConfigError(f"workdir {workdir} holds results of a different config ({differing}); "
                        "use a new --workdir, or delete that one to start over")
  elif distributed.is_primary():
    write_json_atomic(path, json.loads(config.to_json()))
  distributed.sync("config.json")
  if stored is None and not distributed.is_primary():
    differing = _differing(_stored_config(path) or {}, current)
    if differing:
      raise ConfigError(f"process {jax.process_index()} has a different config from process 0 "
                        f"({differing}); start every process with the same flags")


def _non_result(key: str) -> bool:
  """Whether a flattened config key is (inside) one of NON_RESULT_FIELDS."""
  return any(key == f or key.startswith(f + ".") for f in NON_RESULT_FIELDS)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def _stored_config(path: str) -> dict[str, Any] | None:
  """The flattened result fields of a stored `config.json`, completed by the schema (fields
  it lacks at their defaults; fields the schema no longer declares kept)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  stored = json.loads(complete(ml_collections.ConfigDict(stored), strict=False).to_json())
  return {k: v for k, v in _flatten(stored).items() if not _non_result(k)}


def _differing(stored: dict[str, Any], current: dict[str, Any]) -> str:
  """'' when equal, else the first differing fields as 'key (stored -> current)'."""
  differing = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
  return ", ".join(f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in differing[:5])
