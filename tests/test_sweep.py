"""Sweeps: axis products and groups, the stacked (vmapped) step equals separate steps,
and a whole tiny sweep stacked equals the same sweep run variant by variant."""

import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from conftest import load_config
from dett_jax.data.pipeline import example_weights
from dett_jax.methods import Models
from dett_jax.optimizers import make_optimizer
from dett_jax.sharding import make_mesh, replicate, shard_batch
from dett_jax.sweep import group_stage_name, place_stacked, run_sweep, stack
from dett_jax.sweep_axes import SweepError, group_variants, parse_subset, variants
from dett_jax.models.projector import Projector
from dett_jax.models.resnet import create_resnet
from dett_jax.training.looped import LoopedTrainStep, pad_variants
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_stacked_train_step, make_train_step
from dett_jax.models.backend import Backend
from test_steps import LOSS_CONFIG, batch, setup

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)


def host_copy(run):
  """`setup`'s (method, models, params, collections, frozen) with its arrays on the host."""
  method, models, *trees = run
  return (method, models, *jax.tree.map(np.asarray, trees))


def test_variants_product_subset_and_groups():
  axes = {"projector": ("linear", "simkd"), "lambda_up": (1, 5), "seed": (0, 1, 2)}
  all_variants = variants(axes)
  assert len(all_variants) == 12 and all_variants[0] == {"projector": "linear", "lambda_up": 1, "seed": 0}
  subset = parse_subset("projector=simkd; seed=0,2")
  assert subset == {"projector": ["simkd"], "seed": [0, 2]}
  some = variants(axes, subset)
  assert len(some) == 4 and all(v["projector"] == "simkd" and v["seed"] != 1 for v in some)
  # loss weights: lambda_up and seeds stack; one group per projector
  groups = group_variants(all_variants, "loss_weight")
  assert [len(g) for g in groups] == [6, 6]
  # upsampling changes the data: lambda_up splits the groups
  assert [len(g) for g in group_variants(all_variants, "upsample")] == [3, 3, 3, 3]
  assert [len(g) for g in group_variants(all_variants, "loss_weight", stack=False)] == [1] * 12
  from dett_jax.workdir import _non_result  # a workdir may be re-run with other axes
  assert _non_result("sweep.axes.seed") and not _non_result("sweep.method")
  key = (("projector", "simkd"),)  # another subset of the same group: another stage
  assert group_stage_name(key, groups[1]).startswith("sweep_projector=simkd_")
  assert group_stage_name(key, groups[1]) != group_stage_name(key, groups[1][:3])
  with pytest.raises(SweepError, match="unknown axis 'width'"):
    variants({"width": (1, 2)})
  with pytest.raises(SweepError, match=r"projector=\['pooled'\] not among"):
    variants(axes, {"projector": ["pooled"]})


def test_bad_sweep_fields_are_refused_before_any_work(tmp_path):
  config = load_config("ablation", "tiny")
  config.sweep.mesh_axis = "sweep"
  with pytest.raises(SweepError, match="mesh_axis='sweep'"):
    run_sweep(config, str(tmp_path))
  config.sweep.mesh_axis = ""
  config.sweep.execution = "unroll"
  with pytest.raises(SweepError, match="sweep.execution='unroll'; choose auto, vmap or loop"):
    run_sweep(config, str(tmp_path))
  config.sweep.execution = "auto"
  config.sweep.subset = "projector=identity"
  with pytest.raises(SweepError, match="not among the axis values"):
    run_sweep(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mesh_shape,axis,execution", [
    ((8, 1), None, "vmap"), ((4, 2), "model", "vmap"), ((8, 1), None, "loop"),
    ((4, 2), "model", "loop")])
def test_stacked_step_equals_separate_steps(mesh_shape, axis, execution):
  """Variants (seed, lambda_up, learning rate differ) in one vmapped step, or looped one
  per device column, vs separate steps; with `axis`, the variant axis is sharded over the
  mesh's model axis (looped: 3 variants padded to 4, one per column at a time)."""
  mesh = make_mesh(*mesh_shape)
  optim = load_config("synthetic").distill.optim  # AdamW with warmup + cosine
  optim.update(learning_rate=1e-3, epochs=1)
  n, error_set = 64, np.array([1, 5, 9, 33, 40])
  lambdas, lr_scales, seeds = (1.0, 5.0, 20.0), (1.0, 0.5, 2.0), (0, 1, 2)
  vmapped = execution == "vmap"
  k = 2 if axis and vmapped else 3  # a vmapped axis must divide the mesh axis when sharded
  runs = [host_copy(setup("dett", seed=s)) for s in seeds[:k]]  # host copies: steps donate
  method, frozen = runs[0][0], runs[0][4]
  if axis and vmapped:  # what the sweep builds for a sharded variant axis: 1x1 convolutions as dots
    backend = Backend(pointwise_dot=True)
    method = type(method)(Models(student=create_resnet(10, None, width=0.0625, stem="small",
                                                       backend=backend),
                                 projector=Projector("simkd", 64, backend=backend),
                                 teacher=method.models.teacher), LOSS_CONFIG)
  batches = [batch(n=16, seed=i) for i in range(3)]
  for i, b in enumerate(batches):
    b["index"] = (np.arange(16) + 16 * i).astype(np.int32)
  weights = np.stack([example_weights(n, error_set, lam) for lam in lambdas[:k]])

  # separate: each variant with its own optimizer (learning rate scaled) and weights
  separate = []
  for j in range(k):
    tx = make_optimizer(ml_collections.ConfigDict(
        {**optim.to_dict(), "learning_rate": optim.learning_rate * lr_scales[j]}), 10, 16)
    state = replicate(TrainState.create(runs[j][2], runs[j][3], tx), mesh)
    f = replicate(frozen, mesh)
    step = jit_train_step(make_train_step(method, tx), mesh, state, f)
    losses = []
    for b in batches:
      state, m = step(state, shard_batch(dict(b, weight=weights[j][b["index"]]), mesh), f)
      losses.append(float(m["loss"]))
    separate.append((losses, state))

  tx = make_optimizer(optim, 10, 16)
  states = stack([TrainState.create(r[2], r[3], tx) for r in runs])
  per_variant = {"weights": weights, "lr_scale": np.array(lr_scales[:k], np.float32),
                 "rng": np.zeros((k, 2), np.uint32)}
  if vmapped:
    states = place_stacked(states, mesh, axis)
    f = replicate({**frozen, "variants": per_variant}, mesh)
    step = jit_train_step(make_stacked_train_step(method, tx), mesh, states, f)
  else:
    states, per_variant = pad_variants((states, per_variant), mesh.shape[axis] if axis else 1)
    states = place_stacked(states, mesh, axis)
    f = {**replicate(frozen, mesh), "variants": place_stacked(per_variant, mesh, axis)}
    looped = LoopedTrainStep(method, tx, mesh, axis, k)
    step_rows = looped.compile(states, shard_batch(batches[0], mesh), f)
    assert looped.compilations == 2  # the teacher; one variant per column
    assert states.step.shape == ((4,) if axis else (3,))

    def step(states, b, f):
      states, rows = step_rows(states, b, f)
      return states, looped.host_metrics(jax.device_get(rows))
  if axis:
    assert states.params["projector"]["Conv_0"]["kernel"].sharding.spec[0] == "model"
  stacked_losses = []
  for b in batches:
    states, m = step(states, shard_batch(b, mesh), f)
    assert m["loss"].shape == (k,)
    stacked_losses.append(np.asarray(m["loss"]))
  for j in range(k):
    np.testing.assert_allclose([l[j] for l in stacked_losses], separate[j][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[j], states.params)),
                    jax.tree.leaves(separate[j][1].params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_tiny_sweep_stacked_equals_variant_by_variant(tmp_path, execution):
  config = load_config("ablation", "tiny")
  config.sweep.subset = "projector=linear;seed=0"  # lambda_up 1 and 5
  config.sweep.execution = execution
  if execution == "vmap":
    config.sweep.conv = "patches"  # the same convolutions stacked and separate
  else:  # one variant per model column at a time, each column data-parallel over 4 devices
    config.mesh.data, config.mesh.model, config.sweep.mesh_axis = 4, 2, "model"
  config.pretrain.enabled = False
  workdir = str(tmp_path)
  stacked = run_sweep(config, workdir)
  assert len(stacked["runs"]) == 2
  groups = list(stacked["groups"].values())
  assert [g["variants"] for g in groups] == [2] and groups[0]["execution"] == execution
  # vmap: one program for both; loop: the teacher's pass, the step
  assert groups[0]["compilations"] == (1 if execution == "vmap" else 2)
  for name in ("study.md", "study.png", "study.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  study = json.load(open(os.path.join(workdir, "study.json")))
  assert len(study["runs"]) == 2 and "validation" in study["selection"]
  assert "lambda_up" in open(os.path.join(workdir, "study.md")).read()

  config.sweep.stack = False  # the same variants, each its own program (teacher stages reused)
  separate = run_sweep(config, workdir)
  assert len(separate["groups"]) == 2
  by_name = {r["name"]: r["metrics"] for r in separate["runs"]}
  for run in stacked["runs"]:
    for key, value in run["metrics"].items():
      np.testing.assert_allclose(by_name[run["name"]][key], value, rtol=1e-5, err_msg=key)


def test_stacked_step_guards_each_variant_alone():
  """A variant whose loss is NaN keeps its state (only its step counts); the others train."""
  mesh = make_mesh(8, 1)
  runs = [host_copy(setup("dett", seed=s)) for s in (0, 1)]
  method, frozen = runs[0][0], runs[0][4]
  tx = optax.adamw(1e-3)
  states = place_stacked(stack([TrainState.create(r[2], r[3], tx) for r in runs]), mesh, None)
  weights = np.ones((2, 16), np.float32)
  weights[1, 3] = np.nan  # variant 1's weighted loss is NaN
  f = replicate({**frozen, "variants": {"weights": weights, "lr_scale": np.ones(2, np.float32),
                                        "rng": np.zeros((2, 2), np.uint32)}}, mesh)
  before = jax.tree.map(np.array, (states.params, states.collections, states.opt_state))
  step = jit_train_step(make_stacked_train_step(method, tx), mesh, states, f)
  b = dict(batch(n=16), index=np.arange(16, dtype=np.int32))
  states, m = step(states, shard_batch(b, mesh), f)
  np.testing.assert_array_equal(np.asarray(m["nonfinite_loss"]), [0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(states.step), [1, 1])
  after = jax.tree.map(np.array, (states.params, states.collections, states.opt_state))
  for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a[1], c[1])  # the diverged variant: unchanged
  assert any(not np.array_equal(a[0], c[0]) for a, c in
             zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
