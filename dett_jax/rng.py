"""Named randomness: every random draw comes from the run seed and a stable name.

A draw's seed depends only on `config.seed` and the names of what it is for (stage,
method, purpose), never on the order in which methods are listed or trained.

Examples:
  >>> from dett_jax import rng
  >>> rng.seed(0, "student", "dett", "data") == rng.seed(0, "student", "dett", "data")
  True
  >>> rng.seed(0, "student", "dett", "data") != rng.seed(0, "student", "kd", "data")
  True
"""

from __future__ import annotations

import hashlib

import jax


def seed(run_seed: int, *names: str | int) -> int:
  """A 31-bit integer seed for `names` under `run_seed` (a stable hash: the same on every
  host, process and Python version)."""
  text = "/".join([str(int(run_seed)), *map(str, names)])
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % (2**31)


def key(run_seed: int, *names: str | int) -> jax.Array:
  """A `jax.random.key` for `names` under `run_seed` (see `seed`)."""
  return jax.random.key(seed(run_seed, *names))
