"""The one train state: what a step trains and carries from one step to the next."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Tree = Any


@flax.struct.dataclass
class TrainState:
  """Step counter, trained parameters, mutable collections and optimizer state.

  Used by the public losses' convenience steps, the bundled trainer, and the stacked
  (vmapped) and looped sweep executions alike.

  Attributes:
    step: number of updates applied or skipped, int32 scalar.
    params: the trained parameters, by role: `{"student": ..., "projector": ...}` (and a
      method's own parameters, e.g. `"head"`).
    collections: state that is not trained by gradients, by role: e.g.
      `{"student": {"batch_stats": ...}, "projector": {...}}` (Flax collections) and a
      method's own state (group DRO's `{"gdro": {"q": [G]}}`).
    opt_state: the optimizer state of `params`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dett_jax import TrainState
    >>> state = TrainState.create({"student": {"w": jnp.ones(3)}}, {"student": {}}, optax.sgd(0.1))
    >>> int(state.step), state.params["student"]["w"].shape
    (0, (3,))
  """

  step: jax.Array
  params: Tree
  collections: Tree
  opt_state: optax.OptState

  @classmethod
  def create(cls, params: Tree, collections: Tree, tx: optax.GradientTransformation
             ) -> "TrainState":
    """The state at step 0, with `tx.init(params)`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, collections=collections,
               opt_state=tx.init(params))

  @property
  def variables(self) -> dict[str, Tree]:
    """`{"params": ..., "collections": ...}`: what evaluation and checkpoints of the
    selected model hold."""
    return {"params": self.params, "collections": self.collections}
