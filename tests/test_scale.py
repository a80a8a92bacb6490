"""Sharding strategies (replicated, FSDP, 2-D mesh), checkpoints across them, bfloat16,
and the teacher feature cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from dett_jax.checkpoints import load_variables, save_variables
from dett_jax.experiment import train_and_evaluate
from dett_jax.models.projector import Projector
from dett_jax.models.resnet import create_resnet
from dett_jax.sharding import make_mesh, place, shard_batch, tree_shardings
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_train_step
from test_steps import LOSS_CONFIG, batch, setup

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

MESHES = [("replicated", 8, 1), ("fsdp", 8, 1), ("fsdp", 4, 2), ("replicated", 4, 2)]


def run_steps(strategy, data, model, method_name="dett", steps=3, tx=None):
  method, networks, params, stats, frozen = setup(method_name)
  tx = tx or optax.adamw(1e-3)
  mesh = make_mesh(data, model)
  state = place(TrainState.create(params, stats, tx), mesh, strategy)
  frozen = place(frozen, mesh, strategy)
  step = jit_train_step(make_train_step(method, tx), mesh, state, frozen)
  losses = []
  for k in range(steps):
    state, metrics = step(state, shard_batch(batch(16, seed=k), mesh), frozen)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_fsdp_shards_kernels_and_optimizer_state_over_data():
  state, _ = run_steps("fsdp", 4, 2, steps=1)
  specs = {jax.tree_util.keystr(p): leaf.sharding.spec
           for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  kernel = [k for k in specs if k.endswith("['Conv_0']['kernel']") and ".params" in k][0]
  assert "data" in specs[kernel] and "model" in specs[kernel]
  mu = [k for k in specs if "mu" in k and k.endswith("['Conv_0']['kernel']")][0]
  assert specs[mu] == specs[kernel]  # optimizer state sharded like its parameter
  assert all(s == jax.sharding.PartitionSpec(None) for k, s in specs.items() if "batch_stats" in k)
  leaf = state.params["student"]["BasicBlock_3"]["Conv_0"]["kernel"]
  assert leaf.addressable_shards[0].data.size * 8 == leaf.size  # 1/8 of it per device


@pytest.mark.parametrize("strategy, data, model", MESHES[1:])
def test_strategies_give_the_losses_of_the_replicated_run(strategy, data, model):
  _, reference = run_steps("replicated", 8, 1)
  _, losses = run_steps(strategy, data, model)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_checkpoint_restores_under_another_strategy_and_mesh(tmp_path):
  state, _ = run_steps("fsdp", 4, 2, steps=2)
  save_variables(str(tmp_path / "fsdp"), state)
  for strategy, data, model in (("replicated", 8, 1), ("fsdp", 8, 1), ("replicated", 2, 1)):
    mesh = make_mesh(data, model)
    template = jax.device_put(state, tree_shardings(state, mesh, strategy))
    restored = load_variables(str(tmp_path / "fsdp"), template)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = restored.params["student"]["BasicBlock_3"]["Conv_0"]["kernel"]
    assert leaf.sharding.mesh.shape == mesh.shape


def test_bad_mesh_rules_are_refused():
  from dett_jax.sharding import parse_rules
  with pytest.raises(ValueError, match="regex=kind"):
    parse_rules("fsdp", ("head:replicated",))
  with pytest.raises(ValueError, match="strategy"):
    parse_rules("zero3")
  with pytest.raises(ValueError, match="divide"):
    make_mesh(-1, 3)


def test_bfloat16_step_keeps_float32_parameters_and_losses():
  x = jnp.asarray(batch(8)["image"])
  for dtype in (jnp.float32, jnp.bfloat16):
    model = create_resnet(10, 2, width=0.0625, stem="small", dtype=dtype)
    variables = model.init(jax.random.key(0), x[:1])
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out["feature_map"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(updates))
    projector = Projector("simkd", 64, dtype=dtype)
    p_vars = projector.init(jax.random.key(1), out["feature_map"])
    assert projector.apply(p_vars, out["feature_map"]).dtype == jnp.float32
    if dtype == jnp.float32:
      reference = np.asarray(out["logits"])
  np.testing.assert_allclose(np.asarray(out["logits"]), reference, rtol=0.1, atol=0.05)


def test_bfloat16_pipeline_runs(tmp_path):
  config = tiny_config(**{"precision": "bfloat16", "pretrain.enabled": False,
                          "distill.methods": "dett"})
  results = train_and_evaluate(config, str(tmp_path))
  assert 0 <= results["models"]["student_dett"]["metrics"]["test/worst_group_acc"] <= 1


def step_losses(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]


def test_teacher_cache_gives_the_losses_of_the_uncached_run(tmp_path):
  base = {"augment": False, "pretrain.enabled": False, "distill.methods": "dett",
          "log_every_steps": 1, "mesh.strategy": "fsdp"}
  plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
  train_and_evaluate(tiny_config(**base), plain)
  results = train_and_evaluate(tiny_config(**base, **{"distill.teacher_cache": True}), cached)
  for stage in ("student_dett",):
    a, b = step_losses(plain, stage), step_losses(cached, stage)
    assert len(a) == len(b) > 2
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
  meta = json.load(open(os.path.join(cached, "teacher_cache", "meta.json")))
  assert meta["teacher_feature_map"]["shape"][0] == 96  # every training example once
  assert results["models"]["student_dett"]["metrics"]["test/worst_group_acc"] >= 0
