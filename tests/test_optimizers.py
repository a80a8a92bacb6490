"""Optimizers: LARS/LAMB, learning-rate scaling, gradient accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dett_jax.optimizers import make_optimizer, scaled_learning_rate
from dett_jax import methods
from dett_jax.training.state import TrainState
from dett_jax.training.steps import make_train_step


class MLP(nn.Module):
  """No BatchNorm: its gradient does not depend on how the batch is split."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return {"logits": nn.Dense(2)(h)}


def optim(**fields):
  base = dict(optimizer="sgd", epochs=1, learning_rate=0.1, momentum=0.9, weight_decay=1e-3,
              warmup_epochs=0.0, batch_size=0, accumulate_steps=1, lr_scaling="none",
              base_batch_size=256)
  return ml_collections.ConfigDict({**base, **fields})


def data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
          "label": rng.integers(0, 2, n).astype(np.int32), "weight": np.ones(n, np.float32),
          "mask": np.ones(n, np.float32), "group": np.zeros(n, np.int32)}


def train(tx, batches):
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
  state = TrainState.create({"student": params}, {"student": {}}, tx)
  erm = methods.get("erm")(methods.Models(student=model))
  step = jax.jit(make_train_step(erm, tx))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch, {})
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_accumulated_micro_batches_equal_one_large_batch(name):
  big = [data(32, seed) for seed in range(2)]
  micro = [{k: v[i * 8:(i + 1) * 8] for k, v in b.items()} for b in big for i in range(4)]
  lr = 0.01 if name in ("adamw", "lamb") else 0.1
  one, _ = train(make_optimizer(optim(optimizer=name, learning_rate=lr), 2, 32), big)
  acc, losses = train(make_optimizer(optim(optimizer=name, learning_rate=lr, accumulate_steps=4),
                                     8, 8), micro)
  # Adaptive optimizers divide by sqrt(v), which magnifies float rounding of the
  # averaged gradients for near-zero entries; the bound stays far below the update size.
  atol = 5e-5 if name in ("adamw", "lamb") else 1e-6
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(acc.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
  initial, _ = train(make_optimizer(optim(optimizer=name), 2, 32), [])
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(initial.params),
                                               jax.tree.leaves(one.params))]
  assert max(moved) > 1e-3  # the comparison is not between two untrained models
  assert len(set(losses)) == 8  # every micro-batch was a real step with its own loss


def test_learning_rate_scaling_rules():
  assert scaled_learning_rate(optim(lr_scaling="none"), 1024) == pytest.approx(0.1)
  assert scaled_learning_rate(optim(lr_scaling="linear"), 1024) == pytest.approx(0.4)
  assert scaled_learning_rate(optim(lr_scaling="sqrt"), 1024) == pytest.approx(0.2)
  assert scaled_learning_rate(optim(lr_scaling="linear", base_batch_size=128), 64) == pytest.approx(0.05)
  with pytest.raises(ValueError, match="lr_scaling"):
    scaled_learning_rate(optim(lr_scaling="cubic"), 64)


def test_warmup_then_cosine_and_unknown_optimizer():
  tx = make_optimizer(optim(optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=1.0,
                            epochs=2), 10, 32)
  params = {"w": jnp.ones(())}
  state = tx.init(params)
  rates = []
  for _ in range(20):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    rates.append(-float(updates["w"]))
  assert rates[0] == 0.0 and rates[9] == pytest.approx(0.09) and max(rates) == pytest.approx(0.1)
  assert rates[-1] < 0.01  # cosine decay towards 0 at the last update
  with pytest.raises(ValueError, match="lars, lamb"):
    make_optimizer(optim(optimizer="adagrad"), 10)


@pytest.mark.parametrize("decay, middle, last", [("linear", 0.05, 0.0), ("constant", 0.1, 0.1)])
def test_linear_and_constant_decay_after_the_warmup(decay, middle, last):
  """SGD rates of 20 updates, 5 of them warmup: linear decays to 0 at the last update
  (Hugging Face's linear schedule), constant stays at the peak; an unknown decay is named."""
  tx = make_optimizer(optim(momentum=0.0, weight_decay=0.0, warmup_epochs=0.5, epochs=2,
                            decay=decay), 10, 32)
  params = {"w": jnp.ones(())}
  state = tx.init(params)
  rates = []
  for _ in range(21):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    rates.append(-float(updates["w"]))
  assert rates[0] == 0.0 and rates[5] == pytest.approx(0.1)
  assert rates[5 + 15 // 2] == pytest.approx(middle, abs=0.004)
  assert rates[20] == pytest.approx(last, abs=1e-7)
  with pytest.raises(ValueError, match="cosine, linear, constant"):
    make_optimizer(optim(decay="exponential"), 10)


def test_lars_and_lamb_leave_biases_undecayed():
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ("lars", "lamb"):
    tx = make_optimizer(optim(optimizer=name, weight_decay=0.5), 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["bias"]).max()) == 0.0, name
    assert float(jnp.abs(updates["kernel"]).max()) > 0.0, name


@pytest.mark.parametrize("fields,steps,match", [
    ({"warmup_epochs": 1, "accumulate_steps": 2}, 6,
     r"^warmup_epochs=1 leaves no decay steps with epochs=1 \(and accumulate_steps=2 over 6 "
     r"steps per epoch: 3 updates, all warmup\); lower warmup_epochs below epochs"),
    ({"accumulate_steps": 7}, 6, r"^accumulate_steps=7 with epochs=1 over 6 steps per epoch "
     r"gives no optimizer update"),
    ({"accumulate_steps": 7, "epochs": 3}, 6, r"^accumulate_steps=7 exceeds the 6 steps per epoch"),
    ({"accumulate_steps": 4}, 6, r"^epochs=1 with accumulate_steps=4 over 6 steps per epoch gives "
     r"1 update, .*at least 2; raise epochs or lower accumulate_steps to at most 3"),
    ({}, 1, r"^epochs=1 with 1 steps per epoch gives 1 update, .*raise epochs or lower the batch"),
    ({"warmup_epochs": 0.9, "accumulate_steps": 3}, 10,
     r"^warmup_epochs=0.9 rounds to 3 warmup updates of the 3 updates of epochs=1"),
    ({"warmup_epochs": -1.0}, 6, r"^warmup_epochs=-1 must be >= 0"),
    ({}, 0, r"^steps_per_epoch=0 must be >= 1"),
])
def test_make_optimizer_refuses_a_schedule_without_decay_steps(fields, steps, match):
  """A library user calling make_optimizer directly gets the reason, not optax's
  'cosine_decay_schedule requires positive decay_steps'."""
  with pytest.raises(ValueError, match=match):
    make_optimizer(optim(**fields), steps, 16)


def test_make_optimizer_accepts_the_shortest_schedules():
  for fields, steps in (({}, 2), ({"accumulate_steps": 3}, 6), ({"warmup_epochs": 0.5}, 4),
                        ({"warmup_epochs": 1.0, "epochs": 2}, 1),
                        ({"accumulate_steps": 6, "epochs": 2}, 6)):
    make_optimizer(optim(**fields), steps, 16)
