"""`NNXProjector` is the Linen `Projector` in Flax NNX (same parameters, names and
computation), and `dett_loss` drives a `flax.training.train_state.TrainState` loop."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import dett_jax

STUDENT_MAP = (2, 4, 4, 6)


def linen_variables(kind: str, teacher_channels: int) -> tuple[nn.Module, dict]:
  projector = dett_jax.Projector(kind, teacher_channels)
  return projector, projector.init(jax.random.key(0), jnp.zeros(STUDENT_MAP))


def merged(variables: dict) -> dict:
  """Linen `params` and `batch_stats` as one tree per module (NNX's layout)."""
  out: dict = {}
  for collection in variables.values():
    for name, leaves in collection.items():
      out.setdefault(name, {}).update(leaves)
  return out


def replaced(module: nnx.Module, tree: dict) -> Any:
  """`module`'s state with the values of the pure dict `tree` (matched by name)."""
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, tree)
  return state


@pytest.mark.parametrize("kind,teacher_channels", [("identity", 6), ("linear", 8), ("simkd", 8),
                                                   ("simkd_dw", 8)])
def test_nnx_projector_has_the_linen_parameters_and_computes_the_same(kind, teacher_channels):
  linen, variables = linen_variables(kind, teacher_channels)
  projector = dett_jax.NNXProjector(kind, STUDENT_MAP[-1], teacher_channels, rngs=nnx.Rngs(1))
  state = nnx.state(projector).to_pure_dict()
  want = merged(variables)
  assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, want)
  # Loaded with the Linen values, it computes the same, in inference and in training mode.
  nnx.update(projector, replaced(projector, want))
  x = jax.random.normal(jax.random.key(2), STUDENT_MAP)
  np.testing.assert_allclose(np.asarray(projector(x)), np.asarray(linen.apply(variables, x)),
                             rtol=1e-5, atol=1e-5)
  if "batch_stats" in variables:
    out, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(projector(x, train=True)), np.asarray(out), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(projector.BatchNorm_2.mean[...]),
                               np.asarray(updates["batch_stats"]["BatchNorm_2"]["mean"]),
                               rtol=1e-5, atol=1e-6)


def test_nnx_projector_checks_its_input():
  with pytest.raises(ValueError, match="identity projector needs equal channels"):
    dett_jax.NNXProjector("identity", 4, 6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown projector"):
    dett_jax.NNXProjector("mlp", 4, 6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="takes 4 channels"):
    dett_jax.NNXProjector("linear", 4, 6, rngs=nnx.Rngs(0))(jnp.ones((1, 2, 2, 5)))


class Conv(nn.Module):
  """Conv-BN-ReLU: a feature map with BatchNorm statistics."""

  channels: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.channels, (3, 3), strides=(2, 2), use_bias=False)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))


class State(train_state.TrainState):
  collections: Any = None   # the student's and projector's BatchNorm statistics


def test_dett_loss_in_a_flax_train_state_loop_decreases_the_loss():
  student, teacher, projector = Conv(4), Conv(8), dett_jax.Projector("simkd", 8)
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  s_vars, t_vars = student.init(jax.random.key(1), images), teacher.init(jax.random.key(2), images)
  p_vars = projector.init(jax.random.key(3), jnp.zeros((1, 4, 4, 4)))
  frozen = {"teacher": t_vars, "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}

  def student_fn(params, collections, x, train, rng):
    out, updates = student.apply({"params": params, **collections}, x, train=train,
                                 mutable=["batch_stats"])
    return out, updates if train else collections

  loss_fn = functools.partial(dett_jax.dett_loss, student_fn=student_fn, projector=projector,
                              teacher_fn=lambda v, x: teacher.apply(v, x))
  state = State.create(apply_fn=None, tx=optax.adam(1e-2),
                       params={"student": s_vars["params"], "projector": p_vars["params"]},
                       collections={"student": {"batch_stats": s_vars["batch_stats"]},
                                    "projector": {"batch_stats": p_vars["batch_stats"]}})

  @jax.jit
  def train_step(state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.collections, batch, frozen, jax.random.key(state.step))
    return state.apply_gradients(grads=grads, collections=aux["collections"]), loss

  batch = {"image": images, "weight": jnp.array([1.0, 20.0] * 4), "label": jnp.zeros(8, jnp.int32)}
  losses = []
  for _ in range(10):
    state, loss = train_step(state, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 10
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state.collections["projector"],
                       {"batch_stats": p_vars["batch_stats"]})
  assert all(jax.tree.leaves(moved))   # BatchNorm statistics are carried by the loop
