"""Train steps: transplanted head frozen, sharded step equal to the 1-device step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dett_jax import methods
from dett_jax.methods import Models, Setup
from dett_jax.models.projector import Projector
from dett_jax.models.resnet import create_resnet
from dett_jax.sharding import make_mesh, replicate, shard_batch
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_train_step
from dett_jax.transplant import read_head, transplant_head

LOSS_CONFIG = ml_collections.ConfigDict(dict(
    distill=dict(temperature=3.0, kd_ce_weight=0.0, match="map", head_weight=1.0),
    gdro=dict(eta=0.01, adjustment=0.0)))


def setup(method_name, seed=0):
  """(method, models, params, collections, frozen) of a tiny student of `method_name`."""
  cls = methods.get(method_name)
  teacher = create_resnet(10, 2, width=0.125, stem="small")
  x = jnp.zeros((1, 16, 16, 3))
  t_vars = teacher.init(jax.random.key(seed), x)
  head = read_head(t_vars["params"])
  if cls.student_head:
    models = Models(student=create_resnet(10, 2, width=0.0625, stem="small"), teacher=teacher)
  else:
    models = Models(student=create_resnet(10, None, width=0.0625, stem="small"),
                    projector=Projector("simkd", 64), teacher=teacher)
  method = cls(models, LOSS_CONFIG)
  run = Setup(teacher_head=head, group_counts=np.full(4, 4), input_shape=(16, 16, 3),
              feature_scale=lambda: jnp.ones(64))
  variables = method.init(jax.random.key(seed + 2),
                          models.student.init(jax.random.key(seed + 1), x), run)
  frozen = {"teacher": t_vars, "teacher_head": head, **method.frozen(run)}
  return method, models, variables["params"], variables["collections"], frozen


def batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          "label": rng.integers(0, 2, n).astype(np.int32),
          "group": rng.integers(0, 4, n).astype(np.int32),
          "index": np.arange(n, dtype=np.int32),
          "weight": rng.choice([1.0, 5.0], n).astype(np.float32),
          "mask": np.ones(n, np.float32)}


def paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_transplanted_head_is_frozen_and_not_in_optimizer_state():
  method, networks, params, stats, frozen = setup("dett")
  mesh = make_mesh(1)
  tx = optax.sgd(0.1, momentum=0.9)
  state = replicate(TrainState.create(params, stats, tx), mesh)
  frozen = replicate(frozen, mesh)
  head_before = jax.tree.map(np.array, frozen["head"])
  step = jit_train_step(make_train_step(method, tx), mesh, state, frozen)
  losses = []
  for k in range(3):
    state, metrics = step(state, shard_batch(batch(seed=k), mesh), frozen)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[0] != losses[-1]
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(np.asarray(frozen["head"][name]), head_before[name])
  assert "head" not in state.params
  assert not any("head" in p for p in paths(state.opt_state))
  assert any("projector" in p for p in paths(state.opt_state))


def test_head_trained_without_transplant():
  method, networks, params, stats, frozen = setup("dett_no_transplant")
  mesh = make_mesh(1)
  tx = optax.sgd(0.5)
  state = replicate(TrainState.create(params, stats, tx), mesh)
  step = jit_train_step(make_train_step(method, tx), mesh, state, frozen)
  state, metrics = step(state, shard_batch(batch(), mesh), replicate(frozen, mesh))
  assert "ce_loss" in metrics and "feature_loss" in metrics
  assert float(jnp.abs(state.params["head"]["kernel"]).sum()) > 0


def test_transplant_head_copies_the_teacher_subtree():
  teacher = {"head": {"kernel": jnp.ones((4, 2)), "bias": jnp.arange(2.0)}, "conv": jnp.ones(3)}
  student = {"head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}, "conv": jnp.zeros(3)}
  out = transplant_head(student, read_head(teacher))
  np.testing.assert_array_equal(out["head"]["bias"], [0.0, 1.0])
  np.testing.assert_array_equal(out["conv"], jnp.zeros(3))
  with pytest.raises(ValueError, match="cannot transplant"):
    transplant_head({"head": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}, teacher["head"])


@pytest.mark.parametrize("method_name", ["dett", "kd_up", "jtt"])
def test_sharded_step_matches_single_device(method_name):
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (see conftest.py)"
  method, networks, params, stats, frozen = setup(method_name)
  lr = 0.1
  tx = optax.sgd(lr)
  results = {}
  for devices in (1, 8):
    mesh = make_mesh(devices)
    state = replicate(TrainState.create(*jax.tree.map(jnp.copy, (params, stats)), tx), mesh)
    fz = replicate(frozen, mesh)
    step = jit_train_step(make_train_step(method, tx), mesh, state, fz)
    new_state, metrics = step(state, shard_batch(batch(), mesh), fz)
    grads = jax.tree.map(lambda new, old: (np.asarray(old) - np.asarray(new)) / lr,
                         new_state.params, params)
    results[devices] = (float(metrics["loss"]), grads, new_state.collections)
  (loss1, g1, bs1), (loss8, g8, bs8) = results[1], results[8]
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  flat1, flat8 = jax.tree.leaves(g1), jax.tree.leaves(g8)
  num = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(flat1, flat8)))
  den = np.sqrt(sum(np.sum(a ** 2) for a in flat1))
  assert den > 0 and num / den < 1e-4
  for a, b in zip(jax.tree.leaves(bs1), jax.tree.leaves(bs8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_nonfinite_batch_is_flagged_and_changes_nothing_but_the_step_count():
  method, networks, params, stats, frozen = setup("dett")
  mesh = make_mesh(1)
  tx = optax.adamw(1e-3)
  state = replicate(TrainState.create(params, stats, tx), mesh)
  frozen = replicate(frozen, mesh)
  step = jit_train_step(make_train_step(method, tx), mesh, state, frozen)
  bad = batch()
  bad["image"][5, 3, 3, 1] = np.nan
  before = jax.tree.map(np.array, (state.params, state.collections, state.opt_state))
  state, metrics = step(state, shard_batch(bad, mesh), frozen)
  assert float(metrics["nonfinite_loss"]) == 1.0 and float(metrics["nonfinite_grad"]) == 1.0
  after = jax.tree.map(np.array, (state.params, state.collections, state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 1
  state, metrics = step(state, shard_batch(batch(seed=1), mesh), frozen)
  assert float(metrics["nonfinite_loss"]) == 0.0 and float(metrics["nonfinite_grad"]) == 0.0
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before[0]), jax.tree.leaves(state.params)))
