"""The frozen teacher's outputs for every training example, computed once and kept as
memory-mapped files, so a DeTT/KD step can skip the teacher's forward pass.

Valid only when the student sees un-augmented images (the teacher then always sees
the same input for an example). Layout: `<dir>/<key>.bin` raw arrays plus
`<dir>/meta.json` (shapes and dtypes), written last; a directory without meta.json is
incomplete and is rebuilt. Each process reads only the rows of its own batch slices.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np

from dett_jax.io import write_json_atomic

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
          "float16": np.dtype(np.float16)}


def write_cache(directory: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` (`[n, ...]` each) as memory-mappable files, replacing an incomplete cache."""
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  meta = {}
  for key, array in arrays.items():
    dtype = next(name for name, d in DTYPES.items() if d == array.dtype)
    out = np.memmap(os.path.join(directory, f"{key}.bin"), dtype=array.dtype, mode="w+",
                    shape=array.shape)
    out[:] = array
    out.flush()
    del out
    meta[key] = {"shape": list(array.shape), "dtype": dtype}
  write_json_atomic(os.path.join(directory, "meta.json"), meta)


def open_cache(directory: str) -> dict[str, np.memmap] | None:
  """The cached arrays, memory-mapped read-only; None when there is no complete cache."""
  path = os.path.join(directory, "meta.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  return {key: np.memmap(os.path.join(directory, f"{key}.bin"), dtype=DTYPES[m["dtype"]],
                         mode="r", shape=tuple(m["shape"]))
          for key, m in meta.items()}
