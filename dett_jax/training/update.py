"""The one guarded update: any loss `(params, collections, batch, frozen, rng) -> (loss,
aux)` turned into `update(state, batch, frozen, rng) -> (state, metrics)`.

Every train step of the package is this update: the public `make_dett_step`, the bundled
trainer's step, and the stacked sweep forms (`jax.vmap` of it over variants, or it
dispatched once per variant: `training.looped`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax

from dett_jax.training.state import TrainState

Tree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Tree, Tree, Batch, Tree, "jax.Array | None"], tuple[jax.Array, dict]]
"""`(params, collections, batch, frozen, rng) -> (loss, aux)`: `aux["collections"]` holds
the new mutable collections, `aux["metrics"]` (optional) scalars to report."""


def gradients(loss_fn: LossFn, state: TrainState, batch: Batch, frozen: Tree,
              rng: jax.Array | None) -> tuple[Tree, Tree, dict, jax.Array]:
  """`(grads, new collections, metrics, ok)` of `loss_fn` at `state.params`.

  `ok` is False when the loss or the gradient's global norm is not finite (a NaN or
  infinite gradient, or a norm that overflows float32); the metrics `nonfinite_loss` and
  `nonfinite_grad` (1.0 or 0.0) say which.
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.collections, batch, frozen, rng)
  grad_norm = optax.global_norm(grads)
  loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
  metrics = {"loss": loss, "grad_norm": grad_norm, **aux.get("metrics", {}),
             "nonfinite_loss": 1.0 - loss_ok.astype(jnp.float32),
             "nonfinite_grad": 1.0 - grad_ok.astype(jnp.float32)}
  return grads, aux["collections"], metrics, loss_ok & grad_ok


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Tree,
                    collections: Tree, lr_scale: jax.Array | float | None = None) -> TrainState:
  """`state` after one optimizer step with `grads` (updates times `lr_scale`)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       collections=collections, opt_state=opt_state)


def update(loss_fn: LossFn, tx: optax.GradientTransformation, state: TrainState, batch: Batch,
           frozen: Tree, rng: jax.Array | None = None,
           lr_scale: jax.Array | float | None = None) -> tuple[TrainState, dict]:
  """One guarded optimizer step: (new state, metrics).

  A step whose loss or gradient is not finite changes nothing but the step counter
  (parameters, collections and optimizer state stay as they were); the caller stops the
  run or counts the skip from the `nonfinite_*` metrics. `lr_scale` multiplies the
  updates (e.g. one learning-rate factor per stacked sweep variant). Inside `jax.vmap`
  the guard applies per variant.
  """
  grads, collections, metrics, ok = gradients(loss_fn, state, batch, frozen, rng)
  # A `cond`, not a `where` over every leaf, so a good step does no extra work.
  new_state = lax.cond(ok, lambda: apply_gradients(tx, state, grads, collections, lr_scale),
                       lambda: state.replace(step=state.step + 1))
  return new_state, metrics


def step_rng(rng: jax.Array | None, step: jax.Array) -> jax.Array | None:
  """The key of one step: `rng` folded with the step number (None stays None)."""
  return None if rng is None else jax.random.fold_in(rng, step)


def make_update(loss_fn: LossFn, tx: optax.GradientTransformation,
                rng: jax.Array | None = None) -> Callable[[TrainState, Batch, Tree],
                                                          tuple[TrainState, dict]]:
  """`step(state, batch, frozen) -> (state, metrics)`: `update` with the key `rng` folded
  with the step number (pure; wrap it in `jax.jit`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from dett_jax import TrainState, make_update
    >>> def loss_fn(params, collections, batch, frozen, rng):
    ...   return jnp.mean((batch["x"] * params["w"] - 1.0) ** 2), {"collections": collections}
    >>> tx = optax.sgd(0.1)
    >>> step = jax.jit(make_update(loss_fn, tx))
    >>> state, metrics = step(TrainState.create({"w": jnp.zeros(())}, {}, tx), {"x": jnp.ones(4)}, {})
    >>> int(state.step), round(float(state.params["w"]), 2), float(metrics["nonfinite_loss"])
    (1, 0.2, 0.0)
  """

  def step(state: TrainState, batch: Batch, frozen: Tree) -> tuple[TrainState, dict]:
    return update(loss_fn, tx, state, batch, frozen, step_rng(rng, state.step))

  return step
