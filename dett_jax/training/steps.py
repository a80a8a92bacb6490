"""The bundled trainer's jit-able steps, built from a method (`dett_jax.methods`).

  make_train_step(method, tx, rng)    `(state, batch, frozen) -> (state, metrics)`
  make_stacked_train_step(method, tx) the same update `jax.vmap`-ed over k variants
  make_eval_step(models, method, G)   `(variables, batch, frozen) -> per-group sums`

`state` (`TrainState`) holds only what is trained and its optimizer state; `frozen` holds
the teacher's variables, its head and what the method reads but never trains (a
transplanted head), separate arguments that cannot change.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dett_jax.methods.base import Method, Models, pool, teacher_outputs
from dett_jax.metrics import group_sums
from dett_jax.models.projector import align_spatial
from dett_jax.sharding import batch_sharding, replicated
from dett_jax.training.state import TrainState
from dett_jax.training.update import step_rng, update
from dett_jax.transplant import dense_apply

Batch = dict[str, jnp.ndarray]
Tree = Any


def make_train_step(method: Method, tx: optax.GradientTransformation,
                    rng: jax.Array | None = None) -> Callable:
  """`step(state, batch, frozen) -> (state, metrics)`: the guarded update
  (`training.update.update`) of `method.loss`, after `method.batch_inputs` (the teacher's
  outputs for methods that need them); `rng` (folded with the step) feeds the loss.

  The batch holds `image`, `label`, `weight`, `mask` (and `group` for group DRO); metrics
  are `loss`, `grad_norm`, `train_acc`, the loss's parts and the flags `nonfinite_loss` /
  `nonfinite_grad` (then the update was not applied).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from dett_jax import TrainState, make_train_step, methods
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> images = jnp.ones((4, 2, 2, 3))
    >>> erm = methods.get("erm")(methods.Models(student=Linear()))
    >>> tx = optax.sgd(0.1)
    >>> state = TrainState.create({"student": Linear().init(jax.random.key(0), images)["params"]},
    ...                           {"student": {}}, tx)
    >>> batch = {"image": images, "label": jnp.array([0, 1, 0, 1]), "weight": jnp.ones(4),
    ...          "mask": jnp.ones(4)}
    >>> state, metrics = jax.jit(make_train_step(erm, tx))(state, batch, {})
    >>> int(state.step), float(metrics["nonfinite_loss"])
    (1, 0.0)
  """

  def step(state: TrainState, batch: Batch, frozen: Tree) -> tuple[TrainState, dict]:
    batch = method.batch_inputs(batch, frozen)
    return update(method.loss, tx, state, batch, frozen, step_rng(rng, state.step))

  return step


def variant_update(method: Method, tx: optax.GradientTransformation, state: TrainState, variant: Tree, batch: Batch,
                   shared: Tree) -> tuple[TrainState, dict]:
  """The update of one stacked variant: its example weights (`variant["weights"]` `[n]`,
  gathered with `batch["index"]`), key (`variant["rng"]`, raw key data) and learning-rate
  factor (`variant["lr_scale"]`)."""
  batch = dict(batch, weight=variant["weights"][batch["index"]])
  rng = step_rng(jax.random.wrap_key_data(variant["rng"]), state.step)
  return update(method.loss, tx, state, batch, shared, rng, variant["lr_scale"])


def make_stacked_train_step(method: Method, tx: optax.GradientTransformation) -> Callable:
  """`step(states, batch, frozen) -> (states, metrics)`: `variant_update` `jax.vmap`-ed
  over k variants whose state leaves carry a leading `[k]` axis;
  `frozen["variants"]` holds `weights [k, n]`, `rng [k, 2]` and `lr_scale [k]`. The
  teacher runs once per batch for all variants; a diverged variant alone keeps its state.
  Metrics have a leading `[k]` axis.
  """

  def step(states: TrainState, batch: Batch, frozen: Tree) -> tuple[TrainState, dict]:
    shared = {k: v for k, v in frozen.items() if k != "variants"}
    batch = method.batch_inputs(batch, shared)
    return jax.vmap(lambda s, v: variant_update(method, tx, s, v, batch, shared))(
        states, frozen["variants"])

  return step


def feature_diagnostics(outputs: dict, batch: Batch, frozen: Tree, num_groups: int,
                        pool_fn=None) -> dict[str, jnp.ndarray]:
  """Per-group sums behind `feature_error`, `logit_error` and the per-channel head
  sensitivity of a feature-matching student (docs/design.md, "Diagnostics").

  `feat_sq_err`, `teacher_sq` `[G]` and `teacher_sum` `[G, D]`: the feature maps' squared
  error, squared norm and sum. `logit_sq_err` `[G]`: ||h_T(pool(p(f_S))) - h_T(f_T)||^2
  with the teacher's head `frozen["teacher_head"]`; `teacher_logit_sq` `[G]` and
  `teacher_logit_sum` `[G, K]`. `channel_t_sum`, `channel_t_sq`, `channel_err_sq`
  `[G, C]`: per channel of the pooled features, the teacher's sum and squared sum and the
  student's squared error.
  """
  pool_fn = pool_fn or (lambda x: pool(None, x))
  s_map, t_map = outputs["projected"], batch["teacher_feature_map"]
  if s_map.ndim == 4:
    s_map, t_map = align_spatial(s_map, t_map)
  groups, mask = batch["group"], batch["mask"]
  flat_t = t_map.reshape(t_map.shape[0], -1)
  sums = lambda v: group_sums(v, groups, mask, num_groups)
  onehot = jax.nn.one_hot(groups, num_groups) * mask[:, None]
  s_pool, t_pool = pool_fn(s_map), pool_fn(t_map)
  t_logits = batch["teacher_logits"]
  through_head = dense_apply(frozen["teacher_head"], s_pool)
  return {
      "feat_sq_err": sums(jnp.sum(jnp.square(s_map - t_map).reshape(flat_t.shape), -1)),
      "teacher_sq": sums(jnp.sum(jnp.square(flat_t), -1)),
      "teacher_sum": onehot.T @ flat_t,
      "logit_sq_err": sums(jnp.sum(jnp.square(through_head - t_logits), -1)),
      "teacher_logit_sq": sums(jnp.sum(jnp.square(t_logits), -1)),
      "teacher_logit_sum": onehot.T @ t_logits,
      "channel_t_sum": onehot.T @ t_pool,
      "channel_t_sq": onehot.T @ jnp.square(t_pool),
      "channel_err_sq": onehot.T @ jnp.square(s_pool - t_pool),
  }


def make_eval_step(models: Models, method: Method | None, num_groups: int,
                   diagnostics: bool = True) -> Callable:
  """`eval_step(variables, batch, frozen) -> per-group sums` (`correct`, `count`, ...).

  `variables` is `{"params", "collections"}` of `method`'s student; with `method=None`
  the model evaluated is the teacher in `frozen` (variables unused). With `diagnostics`,
  a student's agreement with the teacher's predictions and, when its outputs hold a
  `projected` map, `feature_diagnostics` are included; without (model selection) the
  teacher is not run for students. Teacher outputs carried by the batch are used instead
  of running the teacher.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from dett_jax import Models, make_eval_step, methods
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> erm = methods.get("erm")(Models(student=Linear()))
    >>> images = jnp.ones((4, 2, 2, 3))
    >>> variables = {"params": {"student": Linear().init(jax.random.key(0), images)["params"]},
    ...              "collections": {"student": {}}}
    >>> batch = {"image": images, "label": jnp.array([0, 1, 0, 1]), "group": jnp.array([0, 1, 2, 3]),
    ...          "mask": jnp.ones(4)}
    >>> sums = jax.jit(make_eval_step(erm.models, erm, num_groups=4))(variables, batch, {})
    >>> sums["count"].tolist()
    [1.0, 1.0, 1.0, 1.0]
  """
  run_teacher = models.teacher is not None and (method is None or diagnostics)

  def eval_step(variables: Tree, batch: Batch, frozen: Tree) -> dict[str, jnp.ndarray]:
    mask, groups = batch["mask"], batch["group"]
    sums = lambda v: group_sums(v, groups, mask, num_groups)
    if run_teacher:
      batch = {**batch, **teacher_outputs(models, frozen, batch)}
    if method is None:
      logits = batch["teacher_logits"]
    else:
      outputs, _ = method.forward(variables["params"], variables["collections"], batch, frozen,
                                  train=False)
      logits = outputs["logits"]
    pred = jnp.argmax(logits, -1)
    out = {"correct": sums((pred == batch["label"]).astype(jnp.float32)),
           "count": sums(jnp.ones_like(mask))}
    if method is not None and run_teacher:
      out["agree"] = sums((pred == jnp.argmax(batch["teacher_logits"], -1)).astype(jnp.float32))
      if "projected" in outputs:
        out.update(feature_diagnostics(outputs, batch, frozen, num_groups,
                                       lambda x: pool(models.teacher, x)))
    return out

  return eval_step


def jit_train_step(step: Callable, mesh: Mesh, state: TrainState, frozen: Tree) -> Callable:
  """`jax.jit` of a train step: batch sharded over the mesh's `data` axis; state and frozen
  trees keep the shardings they have (replicated, or FSDP via `sharding.place`); the
  state is donated.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh
    >>> from dett_jax import TrainState, jit_train_step, make_train_step, methods
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> images = jnp.ones((4, 2, 2, 3))
    >>> tx = optax.sgd(0.1)
    >>> state = TrainState.create({"student": Linear().init(jax.random.key(0), images)["params"]},
    ...                           {"student": {}}, tx)
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> erm = methods.get("erm")(methods.Models(student=Linear()))
    >>> step = jit_train_step(make_train_step(erm, tx), mesh, state, {})
    >>> batch = {"image": images, "label": jnp.array([0, 1, 0, 1]), "weight": jnp.ones(4),
    ...          "mask": jnp.ones(4)}
    >>> state, metrics = step(state, batch, {})
    >>> int(state.step)
    1
  """
  rep, data = replicated(mesh), batch_sharding(mesh)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
  return jax.jit(step, in_shardings=(state_sharding, data, frozen_sharding),
                 out_shardings=(state_sharding, rep), donate_argnums=0)
