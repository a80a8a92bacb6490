"""The public API (`dett_jax.__all__`): documented with runnable examples, typed, and
`dett_loss` (in `make_dett_step`, a `flax.training.train_state.TrainState` loop and an
`nnx.Optimizer` loop) equal to the bundled trainer's DeTT step for Linen and NNX models."""

from __future__ import annotations

import doctest
import functools
import inspect
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import dett_jax
from dett_jax import methods
from dett_jax.training.steps import make_train_step

PUBLIC = sorted(dett_jax.__all__)


# ---------------------------------------------------------------------------
# Docstrings, examples, type hints.
# ---------------------------------------------------------------------------

def test_all_names_exist_and_are_unique():
  assert len(set(dett_jax.__all__)) == len(dett_jax.__all__)
  for name in dett_jax.__all__:
    assert getattr(dett_jax, name) is not None, name
  # The names the package exported before the public API was defined still import.
  for name in ("Preprocess", "Projector", "Split", "align_spatial", "create_resnet",
               "dense_params", "example_weights", "feature_loss", "fit_dfr",
               "group_accuracy_metrics", "group_sums", "jit_train_step", "kd_loss", "load_splits",
               "load_state_dict", "make_train_step", "read_head", "torchvision_to_flax",
               "train_epoch", "transplant_head", "upsampled_indices"):
    assert name in dett_jax.__all__, name


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_with_an_example(name):
  doc = inspect.getdoc(getattr(dett_jax, name)) or ""
  assert len(doc.splitlines()[0]) > 10, f"{name}: no one-line summary"
  assert "Examples:" in doc, f"{name}: no 'Examples:' section"
  example = doc[doc.index("Examples:"):]
  assert ">>> " in example, f"{name}: the Examples section has no doctest"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_doctest_passes(name):
  obj = getattr(dett_jax, name)
  # Fresh globals: every example imports what it uses, so it can be copied as is.
  tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
  assert tests and sum(len(t.examples) for t in tests) >= 2, f"{name}: no doctest found"
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isfunction(getattr(dett_jax, n))])
def test_public_function_is_fully_annotated(name):
  signature = inspect.signature(getattr(dett_jax, name))
  missing = [p.name for p in signature.parameters.values()
             if p.annotation is inspect.Parameter.empty]
  assert not missing, f"{name}: parameters without type hints: {missing}"
  assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type"


def test_py_typed_marker_is_in_the_package():
  import pathlib
  assert (pathlib.Path(dett_jax.__file__).parent / "py.typed").is_file()


# ---------------------------------------------------------------------------
# dett_loss and make_dett_step against the bundled trainer's DeTT step.
# ---------------------------------------------------------------------------

class TinyCNN(nn.Module):
  """Conv-BN-ReLU with stride 2: a feature map `[b, h/2, w/2, channels]` (BatchNorm state)."""

  channels: int
  num_classes: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.channels, (3, 3), strides=(2, 2), use_bias=False)(x)
    feature_map = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    out = {"feature_map": feature_map, "features": feature_map.mean((1, 2))}
    if self.num_classes:
      out["logits"] = nn.Dense(self.num_classes, name="head")(out["features"])
    return out


class TinyCNNNNX(nnx.Module):
  """TinyCNN in Flax NNX."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, channels, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return nnx.relu(self.norm(self.conv(x), use_running_average=not train))


IMAGE = (8, 8, 3)
CONFIG = ml_collections.ConfigDict(dict(distill=dict(match="map", head_weight=1.0)))


def make_batch(seed: int, n: int = 8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, *IMAGE)).astype(np.float32),
          "label": rng.integers(0, 2, n).astype(np.int32),
          "group": rng.integers(0, 4, n).astype(np.int32),
          "index": np.arange(n, dtype=np.int32),
          "weight": rng.choice([1.0, 5.0], n).astype(np.float32),
          "mask": np.ones(n, np.float32)}


def setup():
  teacher, student, projector = TinyCNN(16, 2), TinyCNN(8), dett_jax.Projector("simkd", 16)
  x = jnp.zeros((1, *IMAGE))
  teacher_vars = teacher.init(jax.random.key(0), x)
  student_vars = student.init(jax.random.key(1), x)
  projector_vars = projector.init(jax.random.key(2), jnp.zeros((1, 4, 4, 8)))
  params = {"student": student_vars["params"], "projector": projector_vars["params"]}
  collections = {"student": {"batch_stats": student_vars["batch_stats"]},
                 "projector": {"batch_stats": projector_vars["batch_stats"]}}
  head = dett_jax.read_head(teacher_vars["params"])
  return teacher, student, projector, teacher_vars, head, params, collections


def linen_student_fn(student: nn.Module):
  def student_fn(params, collections, images, train, rng):
    variables = {"params": params, **collections}
    if not train:
      return student.apply(variables, images, train=False)["feature_map"], collections
    out, collections = student.apply(variables, images, train=True, mutable=["batch_stats"])
    return out["feature_map"], collections
  return student_fn


def run_bundled_step(teacher, student, projector, teacher_vars, head, params, collections, tx,
                     steps):
  models = methods.Models(student=student, projector=projector, teacher=teacher)
  step = jax.jit(make_train_step(methods.get("dett")(models, CONFIG), tx))
  state = dett_jax.TrainState.create(params, collections, tx)
  frozen = {"teacher": teacher_vars, "teacher_head": head, "head": head}
  losses = []
  for k in range(steps):
    state, metrics = step(state, make_batch(k), frozen)
    losses.append(float(metrics["loss"]))
  return losses, state.params, state.collections


def test_make_dett_step_matches_the_bundled_dett_step():
  teacher, student, projector, teacher_vars, head, params, collections = setup()
  tx = optax.adamw(1e-2, weight_decay=1e-4)
  steps = 4
  expected, expected_params, expected_collections = run_bundled_step(
      teacher, student, projector, teacher_vars, head, params, collections, tx, steps)

  teacher_fn = lambda v, x: teacher.apply(v, x, train=False)["feature_map"]
  step = jax.jit(dett_jax.make_dett_step(linen_student_fn(student), tx, projector=projector,
                                         teacher_fn=teacher_fn))
  state = dett_jax.TrainState.create(params, collections, tx)
  frozen = {"teacher": teacher_vars, "head": head}
  losses = []
  for k in range(steps):
    state, metrics = step(state, make_batch(k), frozen)
    losses.append(float(metrics["loss"]))
    assert 0.0 <= float(metrics["train_acc"]) <= 1.0 and np.isfinite(float(metrics["grad_norm"]))
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
  assert losses[-1] < losses[0]
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  for got, want in zip(jax.tree.leaves(state.collections), jax.tree.leaves(expected_collections)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)

  # Precomputed teacher feature maps (a teacher cache) give the same step.
  cached_step = jax.jit(dett_jax.make_dett_step(linen_student_fn(student), tx, projector=projector))
  state = dett_jax.TrainState.create(params, collections, tx)
  batch = make_batch(0)
  batch["teacher_feature_map"] = teacher_fn(teacher_vars, batch["image"])
  _, metrics = cached_step(state, batch, {"head": head})
  np.testing.assert_allclose(float(metrics["loss"]), expected[0], rtol=1e-5)

  # The prediction: the transplanted head on the pooled projected map.
  predict = jax.jit(dett_jax.make_dett_predict(linen_student_fn(student), projector))
  logits = predict(params, collections, batch["image"], {"head": head})
  fmap = student.apply({"params": params["student"], **collections["student"]},
                       batch["image"])["feature_map"]
  projected = projector.apply({"params": params["projector"], **collections["projector"]}, fmap)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(dett_jax.dense_apply(head, projected.mean((1, 2)))),
                             rtol=1e-5, atol=1e-6)


class FlaxState(train_state.TrainState):
  collections: Any = None


def test_dett_loss_in_a_flax_train_state_loop_matches_the_bundled_dett_step():
  """`jax.value_and_grad(dett_loss)` and Flax's `TrainState.apply_gradients`: the bundled
  trainer's DeTT step, loss by loss and parameter by parameter."""
  teacher, student, projector, teacher_vars, head, params, collections = setup()
  tx = optax.adamw(1e-2, weight_decay=1e-4)
  steps = 3
  expected, expected_params, _ = run_bundled_step(teacher, student, projector, teacher_vars, head,
                                                  params, collections, tx, steps)
  loss_fn = functools.partial(
      dett_jax.dett_loss, student_fn=linen_student_fn(student), projector=projector,
      teacher_fn=lambda v, x: teacher.apply(v, x, train=False)["feature_map"])

  @jax.jit
  def train_step(state, batch, frozen):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.collections, batch, frozen, jax.random.key(0))
    return state.apply_gradients(grads=grads, collections=aux["collections"]), loss

  state = FlaxState.create(apply_fn=student.apply, params=params, tx=tx, collections=collections)
  losses = []
  for k in range(steps):
    state, loss = train_step(state, make_batch(k), {"teacher": teacher_vars, "head": head})
    losses.append(float(loss))
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


class WithProjector(nnx.Module):
  """An NNX student backbone with the projector on top: images -> projected map."""

  def __init__(self, backbone: nnx.Module, projector: nnx.Module):
    self.backbone, self.projector = backbone, projector

  def __call__(self, x, train: bool = False):
    return self.projector(self.backbone(x, train), train)


def nnx_student(params: dict, projector_variables: dict | None) -> nnx.Module:
  """TinyCNN's weights in an NNX module; with `projector_variables` (the Linen projector's),
  an `NNXProjector` holding them on top."""
  model = TinyCNNNNX(8, nnx.Rngs(0))
  model.conv.kernel.value = params["student"]["Conv_0"]["kernel"]
  model.norm.scale.value = params["student"]["BatchNorm_0"]["scale"]
  model.norm.bias.value = params["student"]["BatchNorm_0"]["bias"]
  if projector_variables is None:
    return model
  projector = dett_jax.NNXProjector("simkd", 8, 16, rngs=nnx.Rngs(1))
  state = nnx.state(projector)
  tree: dict = {}
  for collection in projector_variables.values():
    for name, leaves in collection.items():
      tree.setdefault(name, {}).update(leaves)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(projector, state)
  return WithProjector(model, projector)


def test_make_dett_step_with_an_nnx_student_matches_the_linen_one():
  teacher, student, projector, teacher_vars, head, params, collections = setup()
  tx = optax.adamw(1e-2, weight_decay=1e-4)
  steps = 3
  expected, _, _ = run_bundled_step(teacher, student, projector, teacher_vars, head, params,
                                    collections, tx, steps)
  model = nnx_student(params, None)
  graphdef, nnx_params, nnx_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def student_fn(params, batch_stats, images, train, rng):
    module = nnx.merge(graphdef, params, batch_stats)
    feature_map = module(images, train=train)
    return feature_map, nnx.state(module, nnx.BatchStat)

  step = jax.jit(dett_jax.make_dett_step(
      student_fn, tx, projector=projector,
      teacher_fn=lambda v, x: teacher.apply(v, x, train=False)["feature_map"]))
  state = dett_jax.TrainState.create({"student": nnx_params, "projector": params["projector"]},
                                     {"student": nnx_stats, "projector": collections["projector"]},
                                     tx)
  losses = []
  for k in range(steps):
    state, metrics = step(state, make_batch(k), {"teacher": teacher_vars, "head": head})
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
  nnx.update(model, state.params["student"], state.collections["student"])
  assert not np.allclose(np.asarray(model.norm.mean.value), 0.0)  # BatchNorm statistics moved


def test_dett_loss_in_an_nnx_optimizer_loop_matches_the_bundled_dett_step():
  """An NNX student with an `NNXProjector` inside (`dett_loss(projector=None)`), trained in
  place by `nnx.Optimizer` under `nnx.jit`: the bundled trainer's DeTT step."""
  teacher, student, projector, teacher_vars, head, params, collections = setup()
  tx = optax.adamw(1e-2, weight_decay=1e-4)
  steps = 3
  expected, _, expected_collections = run_bundled_step(
      teacher, student, projector, teacher_vars, head, params, collections, tx, steps)
  model = nnx_student(params, {"params": params["projector"], **collections["projector"]})
  graphdef = nnx.graphdef(model)

  def student_fn(params, batch_stats, images, train, rng):
    module = nnx.merge(graphdef, params, batch_stats)
    return module(images, train=train), nnx.state(module, nnx.BatchStat)

  loss_fn = functools.partial(
      dett_jax.dett_loss, student_fn=student_fn,
      teacher_fn=lambda v, x: teacher.apply(v, x, train=False)["feature_map"])
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch, frozen):
    params, batch_stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {"student": params}, {"student": batch_stats}, batch, frozen)
    nnx.update(model, aux["collections"]["student"])
    optimizer.update(model, grads["student"])
    return loss

  frozen = {"teacher": teacher_vars, "head": head}
  losses = [float(train_step(model, optimizer, make_batch(k), frozen)) for k in range(steps)]
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(model.projector.BatchNorm_2.mean[...]),
      np.asarray(expected_collections["projector"]["batch_stats"]["BatchNorm_2"]["mean"]),
      rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# freeze: a transplanted head inside the trained tree.
# ---------------------------------------------------------------------------

def test_freeze_keeps_the_transplanted_head_bit_identical():
  teacher, student, projector, teacher_vars, head, params, collections = setup()
  params = dett_jax.transplant_head(params, head)   # the head inside the single tree
  teacher_fn = lambda v, x: teacher.apply(v, x, train=False)["feature_map"]
  heads = {}
  for frozen_paths in (["head"], None):
    base = optax.adamw(1e-2, weight_decay=0.1)
    tx = dett_jax.freeze(base, frozen_paths) if frozen_paths else base
    step = jax.jit(dett_jax.make_dett_step(linen_student_fn(student), tx, projector=projector,
                                           teacher_fn=teacher_fn))
    state = dett_jax.TrainState.create(params, collections, tx)
    before = jax.tree.map(np.array, state.params)
    for k in range(5):
      state, metrics = step(state, make_batch(k), {"teacher": teacher_vars})  # head from params
      assert np.isfinite(float(metrics["loss"]))
    heads[bool(frozen_paths)] = state.params["head"]
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before["student"]), jax.tree.leaves(state.params["student"]))]
    assert all(moved)   # everything else trains
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(np.asarray(heads[True][name]), np.asarray(head[name]))
  # Without freeze, AdamW's weight decay alone would move the head.
  assert not np.array_equal(np.asarray(heads[False]["kernel"]), np.asarray(head["kernel"]))


def test_freeze_keeps_no_optimizer_state_for_frozen_leaves_and_names_unknown_paths():
  params = {"student": {"w": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = dett_jax.freeze(optax.adam(0.1), ["head"])
  sizes = sum(x.size for x in jax.tree.leaves(tx.init(params)))
  assert sizes == 2 * 6 + 1    # mu and nu of student/w, and Adam's step count
  nested = dett_jax.freeze(optax.sgd(0.1), [("student", "w")])
  updates, _ = nested.update(params, nested.init(params), params)
  assert float(jnp.abs(updates["student"]["w"]).sum()) == 0.0
  assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0.0
  with pytest.raises(ValueError, match="no parameter at 'haed'"):
    dett_jax.freeze(optax.sgd(0.1), ["haed"]).init(params)


# ---------------------------------------------------------------------------
# The grain upsampling transform.
# ---------------------------------------------------------------------------

def test_upsample_repeats_the_error_set_and_reshuffles_every_epoch():
  ds = grain.MapDataset.range(20)
  error_set = np.array([3, 11])
  upsampled = dett_jax.upsample(ds, error_set, lambda_up=4)
  assert len(upsampled) == 26
  np.testing.assert_array_equal(list(upsampled), dett_jax.upsampled_indices(20, error_set, 4))
  epochs = upsampled.shuffle(seed=7).repeat(2)
  first, second = list(epochs[:26]), list(epochs[26:])
  assert sorted(first) == sorted(second) == sorted(upsampled)
  assert first != second
  assert list(upsampled.shuffle(seed=7)) == first   # deterministic per seed
  same = dett_jax.upsample(ds, np.array([], np.int64), lambda_up=5)
  assert list(same) == list(range(20))
  with pytest.raises(ValueError, match="integer lambda_up"):
    dett_jax.upsample(ds, error_set, lambda_up=2.5)


def test_find_error_set_from_logits_or_predictions():
  labels = np.array([0, 1, 1, 0])
  np.testing.assert_array_equal(dett_jax.find_error_set(np.array([0, 0, 1, 1]), labels), [1, 3])
  logits = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_array_equal(dett_jax.find_error_set(logits, labels), [1])
  with pytest.raises(ValueError, match="differ in shape"):
    dett_jax.find_error_set(np.array([0, 1]), labels)
