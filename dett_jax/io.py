"""Small file helpers: atomic writes and JSON reads. Imports no other dett_jax module.

Every file a run leaves behind is written next to its final path and renamed over it,
so a reader (or a run killed mid-write) sees the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np


def to_builtin(obj: Any) -> Any:
  """`json.dump` default hook: numpy (and jax) scalars and arrays as Python values."""
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if hasattr(obj, "__array__"):  # e.g. jax.Array.
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  raise TypeError(f"Object of type {type(obj).__name__} is not JSON "
                  "serializable")


def replace_atomic(path: str, write_fn: Callable[[str], None]) -> None:
  """Calls write_fn(tmp_path) on a temp file next to `path`, then renames it to `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  def _write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  replace_atomic(path, _write)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as JSON (indent=2) to `path` atomically.

  Numpy scalars/arrays are converted to Python floats, ints and lists.

  Examples:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from dett_jax.io import read_json, write_json_atomic
    >>> path = os.path.join(tempfile.mkdtemp(), "run", "meta.json")
    >>> write_json_atomic(path, {"step": np.int64(3)})
    >>> read_json(path)
    {'step': 3}
  """
  def _write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=False, default=to_builtin)
      f.write("\n")
  replace_atomic(path, _write)


def read_json(path: str) -> Any | None:
  """The JSON value stored at `path`; None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
