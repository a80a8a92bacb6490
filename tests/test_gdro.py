"""Group DRO (Sagawa et al. 2020): the objective, sharded; a group-DRO model beating ERM on
worst-group accuracy; the gdro teacher and student end to end, with a bit-exact resume of
the student's group weights; DFR's C-grid extension at the grid's edge."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_config
from dett_jax import dfr, objectives
from dett_jax.checkpoints import load_variables
from dett_jax.experiment import train_and_evaluate
from dett_jax import methods
from dett_jax.training.loop import Interrupted
from dett_jax.validation import ConfigError, validate_config

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

# ---------------------------------------------------------------------------
# (a) The objective against a hand computation.
# ---------------------------------------------------------------------------


def _reference(losses, groups, mask, q, eta, adj):
  """The update and loss by hand (numpy, float64), groups absent from the batch skipped."""
  num_groups = len(q)
  group_losses, present = np.zeros(num_groups), np.zeros(num_groups, bool)
  for g in range(num_groups):
    m = mask * (groups == g)
    if m.sum() > 0:
      present[g] = True
      group_losses[g] = (m * losses).sum() / m.sum()
  q_new = np.array(q, np.float64)
  for g in range(num_groups):
    if present[g]:
      q_new[g] *= np.exp(eta * (group_losses[g] + adj[g]))
  q_new /= q_new.sum()
  return sum(q_new[g] * group_losses[g] for g in range(num_groups) if present[g]), q_new


def test_group_dro_update_and_loss_match_a_hand_computation():
  losses = np.array([0.5, 2.0, 1.0, 3.0, 0.7, 4.0], np.float32)
  groups = np.array([0, 0, 2, 2, 3, 1], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the only group-1 example is padding
  q = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  counts = np.array([100, 4, 25, 9])
  adj = np.asarray(objectives.group_dro_adjustment(counts, 2.0))
  np.testing.assert_allclose(adj, 2.0 / np.sqrt(counts), rtol=1e-6)
  for eta, adjustment in ((0.01, None), (0.5, adj)):
    loss, q_new, group_losses, present = objectives.group_dro_loss(
        jnp.asarray(losses), jnp.asarray(groups), jnp.asarray(mask), jnp.asarray(q), eta,
        None if adjustment is None else jnp.asarray(adjustment))
    ref_loss, ref_q = _reference(losses, groups, mask, q,
                                 eta, np.zeros(4) if adjustment is None else adjustment)
    assert present.tolist() == [True, False, True, True]
    np.testing.assert_allclose(group_losses, [1.25, 0.0, 2.0, 0.7], rtol=1e-6)
    np.testing.assert_allclose(q_new, ref_q, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # The absent group is not updated: its weight only shrinks by the normalisation.
    np.testing.assert_allclose(q_new[1] / q_new[0], q[1] / q[0] / np.exp(
        eta * (1.25 + (0.0 if adjustment is None else adjustment[0]))), rtol=1e-5)
  # Gradients flow through the group losses only (q_new is a constant).
  grad = jax.grad(lambda l: objectives.group_dro_loss(l, jnp.asarray(groups), jnp.asarray(mask),
                                                      jnp.asarray(q), 0.01)[0])(
      jnp.asarray(losses))
  _, ref_q = _reference(losses, groups, mask, q, 0.01, np.zeros(4))
  expected = [ref_q[0] / 2, ref_q[0] / 2, ref_q[2] / 2, ref_q[2] / 2, ref_q[3], 0.0]
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# (b) Sharded over 8 devices: the group losses are those of the global batch.
# ---------------------------------------------------------------------------


def test_group_dro_under_jit_with_the_batch_sharded_equals_unsharded():
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "model"))
  rng = np.random.default_rng(0)
  b = 32
  losses = rng.exponential(size=b).astype(np.float32)
  # Group 3 only on device 0; group losses must still be those of the whole batch.
  groups = np.where(np.arange(b) < 4, 3, rng.integers(0, 3, b)).astype(np.int32)
  mask = (rng.random(b) > 0.1).astype(np.float32)
  q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
  adj = np.array([0.1, 0.2, 0.3, 0.4], np.float32)

  def fn(losses, groups, mask, q):
    loss, q_new, group_losses, _ = objectives.group_dro_loss(losses, groups, mask, q, 0.3,
                                                             jnp.asarray(adj))
    return loss, q_new, group_losses

  data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = (losses, groups, mask, q)
  placed = [jax.device_put(x, s) for x, s in zip(args, (data, data, data, rep))]
  sharded = jax.jit(fn, in_shardings=(data, data, data, rep), out_shardings=rep)(*placed)
  plain = jax.jit(fn)(*args)
  ref_loss, ref_q = _reference(losses, groups, mask, q, 0.3, adj)
  for s, p in zip(sharded, plain):
    np.testing.assert_allclose(s, p, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sharded[0], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(sharded[1], ref_q, rtol=1e-5)


# ---------------------------------------------------------------------------
# (c) A group-DRO model beats ERM on worst-group accuracy on a biased problem.
# ---------------------------------------------------------------------------


def _biased_data(n: int, p: float, seed: int):
  """2-D data: a noisy core feature (the label) and a clean spurious one agreeing with the
  label with probability p; group = 2 * label + spurious attribute."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  a = np.where(rng.random(n) < p, y, 1 - y)
  x = np.stack([(2 * y - 1) + rng.normal(0, 1.0, n), (2 * a - 1) + rng.normal(0, 0.3, n)], 1)
  return x.astype(np.float32), y.astype(np.int32), (2 * y + a).astype(np.int32)


def _train_linear(x, y, g, dro: bool, steps: int = 500):
  params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
  tx = optax.sgd(0.5)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, opt, q = carry

      def loss_fn(p):
        ce = objectives.cross_entropy(x @ p["w"] + p["b"], y)
        if not dro:
          return jnp.mean(ce), q
        loss, q_new, _, _ = objectives.group_dro_loss(ce, g, jnp.ones(len(y)), q, eta=0.1)
        return loss, q_new

      (_, q), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt = tx.update(grads, opt)
      return (optax.apply_updates(params, updates), opt, q), None

    (params, _, q), _ = jax.lax.scan(step, (params, tx.init(params), jnp.full(4, 0.25)), None,
                                     length=steps)
    return params, q

  return run(params)


def test_group_dro_beats_erm_on_worst_group_accuracy():
  x, y, g = _biased_data(4000, 0.95, seed=0)
  x_test, y_test, g_test = _biased_data(4000, 0.5, seed=1)  # balanced groups

  def worst(params):
    pred = np.argmax(x_test @ np.asarray(params["w"]) + np.asarray(params["b"]), 1)
    return min((pred[g_test == k] == y_test[g_test == k]).mean() for k in range(4))

  erm, _ = _train_linear(x, y, g, dro=False)
  dro, q = _train_linear(x, y, g, dro=True)
  assert worst(erm) < 0.5 and worst(dro) > 0.75, (worst(erm), worst(dro))
  assert abs(float(jnp.sum(q)) - 1.0) < 1e-5 and float(jnp.max(q)) > 0.3  # not uniform


# ---------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"teacher.debias": "dfr,jtt"}, "teacher.debias"),
    ({"teacher.debias": "dfr", "distill.teacher": "gdro"}, "distill.teacher"),
    ({"teacher.debias": "", "distill.teacher": "dfr"}, "distill.teacher"),
    ({"teacher.debias": "dfr,gdro", "gdro.eta": 0.0}, "gdro.eta"),
    ({"distill.methods": "gdro", "gdro.adjustment": -1.0}, "gdro.adjustment"),
])
def test_bad_group_dro_and_teacher_fields_are_refused(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
    validate_config(tiny_config(**overrides))
  assert "\n" not in str(info.value)


def test_gdro_is_a_registered_method_with_its_own_state():
  cls = methods.get("gdro")
  assert cls.student_head and not cls.needs_teacher and not cls.reweight
  setup = methods.Setup(teacher_head=None, group_counts=np.array([9, 1, 4, 16]), input_shape=(1,))
  config = ml_collections.ConfigDict(dict(gdro=dict(eta=0.01, adjustment=2.0)))
  state = cls(methods.Models(student=None), config).init(None, {"params": {}}, setup)
  np.testing.assert_allclose(state["collections"]["gdro"]["q"], [0.25] * 4)
  np.testing.assert_allclose(cls(None, config).frozen(setup)["gdro_adjustment"],
                             [2 / 3, 2.0, 1.0, 0.5], rtol=1e-6)


# ---------------------------------------------------------------------------
# (d, e) End to end: the gdro teacher distilled, the gdro student resumed bit-exactly.
# ---------------------------------------------------------------------------


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_gdro_teacher_and_student_end_to_end_with_an_exact_resume(tmp_path):
  overrides = {"teacher.debias": "dfr,gdro", "distill.teacher": "gdro",
               "distill.methods": "dett,gdro", "pretrain.enabled": False,
               "gdro.eta": 0.5, "gdro.adjustment": 1.0}
  straight = str(tmp_path / "straight")
  results = train_and_evaluate(tiny_config(**overrides), straight)
  models = results["models"]
  assert {"teacher_erm", "teacher_dfr", "teacher_gdro", "student_dett",
          "student_gdro"} <= set(models)
  assert models["teacher_gdro"]["method"] == "gdro"
  for name in ("teacher_gdro", "student_gdro"):
    assert 0.0 <= models[name]["metrics"]["test/worst_group_acc"] <= 1.0
  with open(os.path.join(straight, "results.json")) as f:
    assert "teacher_gdro" in json.load(f)["models"]
  with open(os.path.join(straight, "report.md")) as f:
    report = f.read()
  assert "teacher_gdro" in report and "student_gdro" in report
  # The students distil the gdro teacher: backbone and head both its own (not the ERM's).
  gdro_teacher = load_variables(os.path.join(straight, "teacher_gdro", "final"))
  erm_teacher = load_variables(os.path.join(straight, "teacher_erm", "final"))
  assert not np.array_equal(gdro_teacher["params"]["head"]["kernel"],
                            erm_teacher["params"]["head"]["kernel"])
  with open(os.path.join(straight, "teacher_gdro", "done.json")) as f:
    q_teacher = np.array(json.load(f)["group_weights"])
  assert abs(q_teacher.sum() - 1) < 1e-5 and q_teacher.std() > 0  # updated from 1/G

  # The gdro student stopped after 2 of its 6 steps and resumed: the same final state,
  # its group weights included, bit for bit.
  expected = load_variables(os.path.join(straight, "student_gdro", "final"))
  q = expected["collections"]["gdro"]["q"]
  assert q.shape == (4,) and abs(q.sum() - 1) < 1e-5 and q.std() > 0
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "student_gdro"))
  with pytest.raises(Interrupted, match="student_gdro stopped at step 2"):
    train_and_evaluate(tiny_config(**overrides, stop_after_steps=2), resumed)
  again = train_and_evaluate(tiny_config(**overrides), resumed)
  got = load_variables(os.path.join(resumed, "student_gdro", "final"))
  want, have = _leaves(expected), _leaves(got)
  assert want.keys() == have.keys()
  for key in want:
    np.testing.assert_array_equal(have[key], want[key], err_msg=key)
  assert again["models"]["student_gdro"]["metrics"] == models["student_gdro"]["metrics"]


# ---------------------------------------------------------------------------
# (f) DFR: a best C at the grid's edge extends the grid.
# ---------------------------------------------------------------------------


def _dfr_data():
  """A weak core feature among 39 noise features: a large C overfits, a small one zeroes
  every weight (tuning scores, seed 0: C=100: 0.6, 10: 0.7, 0.1: 0.5, <= 0.03: 0.0)."""
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(4), 20)
  labels = groups // 2
  x = rng.normal(size=(80, 40))
  x[:, 0] += 0.8 * (2 * labels - 1)
  return x.astype(np.float32), labels, groups


def test_dfr_extends_the_c_grid_at_its_edge(caplog):
  x, y, g = _dfr_data()
  grid = (0.1, 0.03)  # 0.1 scores best, at the largest edge
  with caplog.at_level(logging.WARNING):
    result = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=grid, num_refits=2)
  assert set(grid) < set(result.c_scores)  # every score kept
  # 0.3 and 1 each improve on the edge; 3 ties with 1 (a plateau) but the extensions
  # (3 at most) are used up; the tie goes to the larger C.
  assert sorted(set(result.c_scores) - set(grid)) == [0.3, 1.0, 3.0]
  assert result.best_c == 3.0 and result.c_scores[1.0] > result.c_scores[0.1]
  assert "largest value; extending the C grid upward to 0.3" in caplog.text
  # Without extensions the same call keeps the grid (and its edge).
  fixed = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=grid, num_refits=2, max_grid_extensions=0)
  assert set(fixed.c_scores) == set(grid) and fixed.best_c == 0.1
  # Downward: 10 beats 100 at the smallest edge; 3 ties with 10, so 10 stays (now interior).
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    down = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=(100.0, 10.0), num_refits=2)
  assert sorted(down.c_scores) == [3.0, 10.0, 100.0] and down.best_c == 10.0
  assert "smallest value; extending the C grid downward to 3" in caplog.text
  # A tie at the edge is a plateau: no extension.
  tied = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=(0.01, 0.003), num_refits=2)
  assert sorted(tied.c_scores) == [0.003, 0.01]
  assert dfr._beyond(0.01, up=False) == 0.003 and dfr._beyond(0.3, up=False) == 0.1
  assert dfr._beyond(1.0, up=True) == 3.0 and dfr._beyond(3.0, up=True) == 10.0


def test_dfr_with_an_interior_best_c_is_unchanged(caplog):
  x, y, g = _dfr_data()
  grid = (100.0, 10.0, 0.01)
  with caplog.at_level(logging.WARNING):
    result = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=grid, num_refits=2)
  fixed = dfr.fit_dfr(x, y, g, num_classes=2, c_grid=grid, num_refits=2, max_grid_extensions=0)
  assert result.best_c == 10.0 and set(result.c_scores) == set(grid)
  assert "extending" not in caplog.text
  np.testing.assert_array_equal(result.kernel, fixed.kernel)
  np.testing.assert_array_equal(result.bias, fixed.bias)
  assert result.c_scores == fixed.c_scores


# ---------------------------------------------------------------------------
# The gdro train step: q in the collections, updated; kept by a skipped step; sharded == 1 device.
# ---------------------------------------------------------------------------


def test_gdro_step_updates_q_in_the_collections_and_a_skipped_step_keeps_it():
  import flax.linen as nn
  import ml_collections
  from dett_jax.sharding import make_mesh, replicate, shard_batch
  from dett_jax.training.state import TrainState
  from dett_jax.training.steps import jit_train_step, make_train_step

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}

  rng = np.random.default_rng(0)
  n = 16
  batch = {"image": rng.normal(size=(n, 2, 2, 3)).astype(np.float32),
           "label": rng.integers(0, 2, n).astype(np.int32),
           "group": np.where(np.arange(n) < 8, 0, rng.integers(1, 3, n)).astype(np.int32),
           "index": np.arange(n, dtype=np.int32), "weight": np.ones(n, np.float32),
           "mask": np.ones(n, np.float32)}
  config = ml_collections.ConfigDict(dict(gdro=dict(eta=0.5, adjustment=0.0)))
  frozen = {"gdro_adjustment": jnp.array([0.1, 0.2, 0.3, 0.4])}
  tx = optax.sgd(0.1)
  params = {"student": Linear().init(jax.random.key(0), batch["image"][:1])["params"]}
  q0 = jnp.full((4,), 0.25)
  make = lambda: TrainState.create(jax.tree.map(jnp.copy, params),  # the jitted step donates it
                                   {"student": {}, "gdro": {"q": jnp.copy(q0)}}, tx)
  step = make_train_step(methods.get("gdro")(methods.Models(student=Linear()), config), tx)
  results = []
  for devices in (1, 8):
    mesh = make_mesh(devices)
    state = replicate(make(), mesh)
    placed = replicate(frozen, mesh)
    jitted = jit_train_step(step, mesh, state, placed)
    new, metrics = jitted(state, shard_batch(batch, mesh), placed)
    results.append((jax.device_get(new), jax.device_get(metrics)))
  (one, m1), (eight, m8) = results
  q = one.collections["gdro"]["q"]
  assert q[3] < 0.25 and q[3] == q.min()  # group 3 absent: not updated, only renormalised
  assert abs(q.sum() - 1) < 1e-6 and m1["gdro_max_q"] == pytest.approx(q.max())
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Divergence guard: a NaN batch changes nothing but the step counter (q included).
  bad = dict(batch, image=np.full_like(batch["image"], np.nan))
  mesh = make_mesh(1)
  state = replicate(make(), mesh)
  skipped, metrics = jax.jit(step)(state, bad, frozen)
  assert float(metrics["nonfinite_loss"]) == 1.0 and int(skipped.step) == 1
  np.testing.assert_array_equal(skipped.collections["gdro"]["q"], q0)


def test_a_gdro_sweep_is_accepted():
  """Group DRO's state lives in the state's collections, so stacked sweeps train it."""
  from dett_jax.config_schema import complete
  from dett_jax.sweep_axes import check_sweep
  config = tiny_config()
  config.sweep = ml_collections.ConfigDict(dict(axes={"seed": (0, 1)}, method="gdro"))
  assert len(check_sweep(complete(config))) == 2
