"""Transplanting the teacher's last layer into the student (DeTT step 3)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]


def read_head(params: Params, name: str = "head") -> dict[str, jnp.ndarray]:
  """Returns a copy of the Dense subtree `params[name]` (`kernel [d, k]`, `bias [k]`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import read_head
    >>> teacher_params = {"conv": {"kernel": jnp.ones((3, 3, 3, 8))},
    ...                   "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
    >>> head = read_head(teacher_params)
    >>> head["kernel"].shape, head["bias"].shape
    ((8, 2), (2,))
  """
  if name not in params:
    raise KeyError(f"no {name!r} subtree in parameters with keys {sorted(params)}")
  return jax.tree.map(jnp.array, dict(params[name]))


def transplant_head(student_params: Params, head: Params, name: str = "head") -> dict[str, Any]:
  """Returns `student_params` with the subtree `name` replaced by a copy of `head`.

  The shapes must match those already in the student (when it has a head; ValueError
  otherwise). The head must then stay frozen: keep it out of the optimizer (pass it as
  `frozen["head"]` to `make_dett_step`), or freeze its path with `freeze`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import transplant_head
    >>> head = {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}
    >>> params = transplant_head({"student": {"w": jnp.ones(3)}}, head)
    >>> sorted(params), params["head"]["kernel"].shape
    (['head', 'student'], (8, 2))
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
  """Applies a Dense subtree to pooled features `[b, d]` -> logits `[b, k]` (float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import dense_apply
    >>> head = {"kernel": jnp.array([[1.0, -1.0], [0.0, 2.0]]), "bias": jnp.array([0.5, 0.0])}
    >>> dense_apply(head, jnp.array([[1.0, 1.0]]))
    Array([[1.5, 1. ]], dtype=float32)
  """
  return features.astype(jnp.float32) @ head["kernel"] + head["bias"]
