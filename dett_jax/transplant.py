"""Transplanting the teacher's last layer into the student (DeTT step 3)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]


def read_head(params: Params, name: str = "head") -> dict[str, jnp.ndarray]:
  """Returns a copy of the Dense subtree `params[name]` (`kernel [d, k]`, `bias [k]`)."""
  if name not in params:
    raise KeyError(f"no {name!r} subtree in parameters with keys {sorted(params)}")
  return jax.tree.map(jnp.array, dict(params[name]))


def transplant_head(student_params: Params, head: Params, name: str = "head") -> dict[str, Any]:
  """Returns `student_params` with the subtree `name` replaced by a copy of `head`.

  The shapes must match those already in the student (when it has a head).
  """
  out = dict(student_params)
  if name in out:
    old = jax.tree.map(jnp.shape, dict(out[name]))
    new = jax.tree.map(jnp.shape, dict(head))
    if old != new:
      raise ValueError(f"cannot transplant head of shapes {new} into a student head of shapes {old}")
  out[name] = jax.tree.map(jnp.array, dict(head))
  return out


def dense_apply(head: Params, features: jnp.ndarray) -> jnp.ndarray:
  """Applies a Dense subtree to pooled features `[b, d]` -> logits `[b, k]`."""
  return features.astype(jnp.float32) @ head["kernel"] + head["bias"]
