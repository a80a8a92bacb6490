"""Pure train and eval steps: `(state, batch, frozen) -> (state, metrics)`.

`state` holds only what is trained (student backbone, projector, and a head when
the method trains one) and its optimizer state. `frozen` holds the teacher's
variables and the transplanted head; they are separate arguments, never in the
optimizer state, so they cannot change.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from dett_jax import objectives
from dett_jax.dett import apply_projector, matched_feature_loss
from dett_jax.methods import Method
from dett_jax.metrics import group_sums
from dett_jax.models.projector import align_spatial
from dett_jax.sharding import batch_sharding, replicated
from dett_jax.transplant import dense_apply

Batch = dict[str, jnp.ndarray]
Tree = Any


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Tree
  batch_stats: Tree
  opt_state: optax.OptState


def create_state(params: Tree, batch_stats: Tree, tx: optax.GradientTransformation) -> TrainState:
  """The bundled trainer's state at step 0: `params`, `batch_stats` and `tx.init(params)`.

  Both trees are laid out by role: `{"student": ..., "projector": ...}` (and `"head"` in
  `params` for methods that train their own head).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dett_jax import create_state
    >>> state = create_state({"student": {"w": jnp.ones(3)}}, {"student": {}}, optax.sgd(0.1))
    >>> int(state.step), state.params["student"]["w"].shape
    (0, (3,))
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


@flax.struct.dataclass
class Networks:
  """The modules the bundled trainer's steps apply (static, not traced).

  Attributes:
    student: Linen module; `apply(..., train=)` returns a dict with `logits` (methods
      with their own head) or `feature_map` `[b, h, w, c]` (feature methods).
    projector: Linen module for feature methods (e.g. `Projector`), else None.
    teacher: Linen module returning `feature_map` and `features` (methods with a
      teacher), else None.

  Examples:
    >>> from dett_jax import Networks, Projector, create_resnet
    >>> networks = Networks(student=create_resnet(10, None, width=0.0625, stem="small"),
    ...                     projector=Projector("linear", teacher_channels=64),
    ...                     teacher=create_resnet(18, 2, width=0.125, stem="small"))
    >>> networks.projector.kind
    'linear'
  """

  student: nn.Module = flax.struct.field(pytree_node=False)
  projector: nn.Module | None = flax.struct.field(pytree_node=False, default=None)
  teacher: nn.Module | None = flax.struct.field(pytree_node=False, default=None)


CACHED_TEACHER_KEYS = ("teacher_feature_map", "teacher_logits")


def teacher_outputs(networks: Networks, frozen: Tree, images: jnp.ndarray,
                    batch: Batch | None = None) -> dict[str, jnp.ndarray]:
  """Teacher in inference mode (BatchNorm running statistics), gradients stopped.

  When `batch` carries cached teacher outputs (`teacher_feature_map` `[b, h, w, c]`,
  `teacher_logits` `[b, k]`, e.g. from `data.pipeline.train_epoch(..., cached=...)`),
  they are used instead and the teacher is not run.
  """
  if batch is not None and all(k in batch for k in CACHED_TEACHER_KEYS):
    return jax.lax.stop_gradient({"feature_map": batch["teacher_feature_map"].astype(jnp.float32),
                                  "logits": batch["teacher_logits"].astype(jnp.float32)})
  out = networks.teacher.apply(frozen["teacher"], images, train=False)
  logits = dense_apply(frozen["teacher_head"], out["features"])
  return jax.lax.stop_gradient({"feature_map": out["feature_map"], "logits": logits})


def student_outputs(networks: Networks, method: Method, params: Tree, batch_stats: Tree,
                    frozen: Tree, images: jnp.ndarray, train: bool) -> tuple[dict, Tree]:
  """Student forward pass: logits, and the projected feature map for feature methods."""
  mutable = ["batch_stats"] if train else False
  variables = {"params": params["student"], "batch_stats": batch_stats["student"]}
  out = networks.student.apply(variables, images, train=train, mutable=mutable)
  out, new_stats = out if train else (out, {})
  new_batch_stats = {"student": new_stats.get("batch_stats", batch_stats["student"])}
  if method.objective != "feature":
    return {"logits": out["logits"]}, new_batch_stats
  projected, new_batch_stats["projector"] = apply_projector(
      networks.projector, params["projector"], batch_stats.get("projector", {}),
      out["feature_map"], train)
  head = frozen["head"] if method.transplant else params["head"]
  pooled = jnp.mean(projected, axis=(1, 2))
  # Without transplant, the head learns on the matched features only (no gradient
  # into the backbone), so the features train exactly as in DeTT.
  head_input = pooled if method.transplant else jax.lax.stop_gradient(pooled)
  return {"logits": dense_apply(head, head_input), "projected": projected,
          "pooled": pooled}, new_batch_stats


def method_loss(method: Method, student: dict, teacher: dict | None, batch: Batch,
                config: Any, frozen: Tree = None) -> tuple[jnp.ndarray, dict]:
  """Scalar loss of `method` on one batch, and its parts.

  Feature methods: DeTT's weighted MSE between the projected student map and the
  teacher's (`dett`, exactly the paper's); `method.standardize` divides both per channel
  by the teacher feature's training-set standard deviation (`frozen["feature_scale"]`
  holds its inverse); `method.head_term` adds `config.head_weight` x the weighted MSE
  between the transplanted head's logits on the projected student and the teacher's
  logits (`head_loss`)."""
  weights = batch["weight"] * batch["mask"]
  parts = {}
  if method.objective == "ce":
    loss = objectives.weighted_mean(objectives.cross_entropy(student["logits"], batch["label"]), weights)
  elif method.objective == "kd":
    kd = objectives.weighted_mean(
        objectives.kd_loss(student["logits"], teacher["logits"], config.temperature), weights)
    ce = objectives.weighted_mean(objectives.cross_entropy(student["logits"], batch["label"]), weights)
    loss = (1.0 - config.kd_ce_weight) * kd + config.kd_ce_weight * ce
    parts = {"kd_loss": kd, "ce_loss": ce}
  else:
    scale = (frozen or {}).get("feature_scale") if method.standardize else None
    if method.standardize and scale is None:
      raise KeyError(f"method {method.name} needs frozen['feature_scale'] (1 / the teacher "
                     "feature's per-channel standard deviation, see "
                     "experiment.teacher_feature_scale)")
    loss = matched_feature_loss(student["projected"], teacher["feature_map"], weights,
                                config.match, scale)
    parts = {"feature_loss": loss}
    if method.head_term:  # matching that sees the head: the error through h_T
      head = objectives.head_space_loss(student["logits"], teacher["logits"], weights)
      parts["head_loss"] = head
      loss = loss + config.head_weight * head
    if method.trains_head:
      ce = objectives.weighted_mean(objectives.cross_entropy(student["logits"], batch["label"]), weights)
      parts["ce_loss"] = ce
      loss = loss + ce
  return loss, parts


def gdro_loss(student: dict, batch: Batch, gdro_stats: Tree, config: Any
              ) -> tuple[jnp.ndarray, dict, Tree]:
  """Group-DRO cross-entropy on the batch's training group labels (`batch["group"]`):
  (loss, parts, new `{"q": [G]}`), see `objectives.group_dro_loss`.

  The group weights `q` live in the state's `batch_stats["gdro"]` (not trained by the
  optimizer, checkpointed and restored with the state; a skipped step keeps them).
  `config.gdro_eta` is the step size (default 0.01) and `config.gdro_adjustment` the
  per-group adjustment C / sqrt(n_g) (a length-G sequence; absent: 0).
  """
  weights = batch["weight"] * batch["mask"]
  ce = objectives.cross_entropy(student["logits"], batch["label"])
  adjustment = getattr(config, "gdro_adjustment", None)
  adjustment = None if adjustment is None else jnp.asarray(adjustment, jnp.float32)
  loss, q, _, _ = objectives.group_dro_loss(ce, batch["group"], weights, gdro_stats["q"],
                                            eta=getattr(config, "gdro_eta", 0.01),
                                            adjustment=adjustment)
  parts = {"ce_loss": objectives.weighted_mean(ce, weights), "gdro_max_q": jnp.max(q)}
  return loss, parts, {"q": q}


def train_gradients(networks: Networks, method: Method, config: Any, state: TrainState,
                    batch: Batch, frozen: Tree, teacher: dict | None
                    ) -> tuple[Tree, Tree, dict, jnp.ndarray]:
  """The student's gradients on one batch: (grads, new BatchNorm statistics, metrics, ok).

  `ok` is False when the loss or the gradient's global norm is not finite (a NaN or
  infinite gradient, or one whose norm overflows float32); `metrics` flags which.
  """

  def loss_fn(params):
    student, new_stats = student_outputs(networks, method, params, state.batch_stats, frozen,
                                         batch["image"], train=True)
    if method.objective == "gdro":  # the group weights are state, updated with the loss
      loss, parts, new_stats["gdro"] = gdro_loss(student, batch, state.batch_stats["gdro"],
                                                 config)
    else:
      loss, parts = method_loss(method, student, teacher, batch, config, frozen)
    return loss, (new_stats, parts, student["logits"])

  (loss, (new_stats, parts, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * batch["mask"]
  metrics = {"loss": loss, "train_acc": jnp.sum(correct) / jnp.maximum(jnp.sum(batch["mask"]), 1),
             "grad_norm": grad_norm, **parts,
             "nonfinite_loss": 1.0 - loss_ok.astype(jnp.float32),
             "nonfinite_grad": 1.0 - grad_ok.astype(jnp.float32)}
  return grads, new_stats, metrics, loss_ok & grad_ok


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Tree,
                    new_stats: Tree, lr_scale: jnp.ndarray | float | None = None) -> TrainState:
  """`state` after one optimizer step with `grads` (updates times `lr_scale`)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=new_stats, opt_state=opt_state)


def _skipped(state: TrainState) -> TrainState:
  return state.replace(step=state.step + 1)


def train_update(networks: Networks, method: Method, tx: optax.GradientTransformation,
                 config: Any, state: TrainState, batch: Batch, frozen: Tree,
                 teacher: dict | None, lr_scale: jnp.ndarray | float | None = None
                 ) -> tuple[TrainState, dict]:
  """One optimizer step of the student given the teacher's outputs (None for methods
  without a teacher). `lr_scale` multiplies the updates (a learning-rate factor, e.g. one
  per stacked sweep variant). Returns (new state, metrics); see `make_train_step`."""
  grads, new_stats, metrics, ok = train_gradients(networks, method, config, state, batch,
                                                  frozen, teacher)
  # Divergence guard: a step with a non-finite loss or gradient changes nothing but
  # the step counter (the loop stops the run, or counts the skip; see training.loop).
  # A `cond`, not a `where` over every leaf, so a good step does no extra work.
  new_state = lax.cond(ok, lambda: apply_gradients(tx, state, grads, new_stats, lr_scale),
                       lambda: _skipped(state))
  return new_state, metrics


def make_train_step(networks: Networks, method: Method, tx: optax.GradientTransformation,
                    config: Any) -> Callable:
  """Returns the bundled trainer's `step(state, batch, frozen) -> (state, metrics)` (pure).

  `method` is one of `dett_jax.methods.METHODS` (dett, kd, kd_up, simkd,
  dett_no_transplant, erm, jtt); `config` holds its loss settings (`temperature`,
  `kd_ce_weight`, `match`; a `config.distill`). The batch holds `image [b, h, w, 3]`,
  `label`, `weight`, `mask` `[b]`; `frozen` holds `teacher` (variables), `teacher_head`
  and, when transplanting, `head`. For DeTT in your own loop, `make_dett_step` takes any
  model as a function instead of `networks`. `gdro` also needs `group [b]` in the batch,
  its group weights `batch_stats["gdro"]["q"]` `[G]` in the state and `gdro_eta` /
  `gdro_adjustment` in `config` (see `gdro_loss`).

  `metrics` holds `loss`, `train_acc`, `grad_norm`, the loss parts, and the flags
  `nonfinite_loss` / `nonfinite_grad` (1.0 when this batch's loss / the gradient's global
  norm is NaN or infinite, i.e. some gradient is, or the norm overflows float32; the
  update is then not applied: parameters, BatchNorm statistics and optimizer state stay
  as they were).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from dett_jax import Networks, create_state, make_train_step
    >>> from dett_jax.methods import METHODS
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> images = jnp.ones((4, 2, 2, 3))
    >>> params = {"student": Linear().init(jax.random.key(0), images)["params"]}
    >>> tx = optax.sgd(0.1)
    >>> step = jax.jit(make_train_step(Networks(student=Linear()), METHODS["erm"], tx, config=None))
    >>> batch = {"image": images, "label": jnp.array([0, 1, 0, 1]), "weight": jnp.ones(4),
    ...          "mask": jnp.ones(4)}
    >>> state, metrics = step(create_state(params, {"student": {}}, tx), batch, {})
    >>> int(state.step), float(metrics["nonfinite_loss"])
    (1, 0.0)
  """

  def step(state: TrainState, batch: Batch, frozen: Tree) -> tuple[TrainState, dict]:
    teacher = (teacher_outputs(networks, frozen, batch["image"], batch) if method.uses_teacher
               else None)
    return train_update(networks, method, tx, config, state, batch, frozen, teacher)

  return step


def make_stacked_train_step(networks: Networks, method: Method,
                            tx: optax.GradientTransformation, config: Any) -> Callable:
  """Returns `step(states, batch, frozen) -> (states, metrics)` training k variants at once.

  `states` is a `TrainState` whose leaves have a leading variant axis `[k, ...]` (same
  shapes, e.g. different seeds); `frozen["variants"]` holds per-variant scalars:
  `weights` `[k, n]` (each variant's weight of every training example, gathered with
  `batch["index"]`: lambda_up and the error set may differ) and `lr_scale` `[k]`.
  The teacher runs once per batch for all variants; the update is `jax.vmap`-ed, so one
  compiled step trains every variant. Metrics have a leading `[k]` axis.
  """

  def step(states: TrainState, batch: Batch, frozen: Tree) -> tuple[TrainState, dict]:
    teacher = (teacher_outputs(networks, frozen, batch["image"], batch) if method.uses_teacher
               else None)
    shared = {k: v for k, v in frozen.items() if k != "variants"}

    def gradients(state, weights):
      return train_gradients(networks, method, config, state,
                             dict(batch, weight=weights[batch["index"]]), shared, teacher)

    v = frozen["variants"]
    grads, new_stats, metrics, ok = jax.vmap(gradients)(states, v["weights"])
    apply_all = lambda: jax.vmap(functools.partial(apply_gradients, tx))(
        states, grads, new_stats, v["lr_scale"])

    def guarded():  # some variant diverged: only that one keeps its state
      new, old = apply_all(), _skipped(states)
      return jax.tree.map(lambda n, o: jnp.where(ok.reshape(ok.shape + (1,) * (n.ndim - 1)), n, o),
                          new, old)

    return lax.cond(jnp.all(ok), apply_all, guarded), metrics

  return step


def feature_diagnostics(student: dict, teacher: dict, frozen: Tree, groups: jnp.ndarray,
                        mask: jnp.ndarray, num_groups: int) -> dict[str, jnp.ndarray]:
  """Per-group sums behind `feature_error`, `logit_error` and the per-channel head
  sensitivity of a feature-matching student (DESIGN.md section 2).

  `feat_sq_err`, `teacher_sq` `[G]` and `teacher_sum` `[G, D]`: the feature maps' squared
  error, squared norm and sum. `logit_sq_err` `[G]`: ||h_T(pool(p(f_S))) - h_T(f_T)||^2
  with the transplanted head `frozen["teacher_head"]` (also for a student with a head of
  its own: the error as the teacher's head sees it); `teacher_logit_sq` `[G]` and
  `teacher_logit_sum` `[G, K]`. `channel_t_sum`, `channel_t_sq`, `channel_err_sq`
  `[G, C]`: per channel of the pooled features, the teacher's sum and squared sum and the
  student's squared error.
  """
  s_map, t_map = align_spatial(student["projected"], teacher["feature_map"])
  flat_t = t_map.reshape(t_map.shape[0], -1)
  sums = lambda v: group_sums(v, groups, mask, num_groups)
  onehot = jax.nn.one_hot(groups, num_groups) * mask[:, None]
  s_pool, t_pool = jnp.mean(s_map, axis=(1, 2)), jnp.mean(t_map, axis=(1, 2))
  t_logits = teacher["logits"]
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


def make_eval_step(networks: Networks, method: Method | None, num_groups: int,
                   diagnostics: bool = True) -> Callable:
  """Returns `eval_step(variables, batch, frozen) -> per-group sums`.

  With `method=None` the model evaluated is the teacher in `frozen` (variables
  unused). For students with `diagnostics`, agreement with the teacher's
  predictions and, for feature methods, the sums of `feature_diagnostics` (relative
  feature and logit errors, per-channel head sensitivity) are included.
  Without `diagnostics` (model selection) the teacher is not run for students. Teacher
  outputs carried by the batch (`teacher_feature_map`, `teacher_logits`) are used instead
  of running the teacher, as in the train step.
  """
  run_teacher = networks.teacher is not None and (method is None or diagnostics)

  def eval_step(variables: Tree, batch: Batch, frozen: Tree) -> dict[str, jnp.ndarray]:
    mask, groups = batch["mask"], batch["group"]
    sums = lambda v: group_sums(v, groups, mask, num_groups)
    teacher = teacher_outputs(networks, frozen, batch["image"], batch) if run_teacher else None
    if method is None:
      logits = teacher["logits"]
    else:
      student, _ = student_outputs(networks, method, variables["params"], variables["batch_stats"],
                                   frozen, batch["image"], train=False)
      logits = student["logits"]
    pred = jnp.argmax(logits, -1)
    out = {"correct": sums((pred == batch["label"]).astype(jnp.float32)),
           "count": sums(jnp.ones_like(mask))}
    if method is not None and teacher is not None:
      out["agree"] = sums((pred == jnp.argmax(teacher["logits"], -1)).astype(jnp.float32))
      if method.objective == "feature":
        out.update(feature_diagnostics(student, teacher, frozen, groups, mask, num_groups))
    return out

  return eval_step


def jit_train_step(step: Callable, mesh: Mesh, state: TrainState, frozen: Tree) -> Callable:
  """`jax.jit` of a train step: batch sharded over `data`; state and frozen trees keep
  the shardings they have (replicated, or FSDP via `sharding.place`); state donated.

  `mesh` has a `data` axis (the bundled trainer's mesh is `(data, model)`); the batch
  must be a global array sharded over it (or fit on one device).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    >>> from jax.sharding import Mesh
    >>> from dett_jax import Networks, create_state, jit_train_step, make_train_step
    >>> from dett_jax.methods import METHODS
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> images = jnp.ones((4, 2, 2, 3))
    >>> tx = optax.sgd(0.1)
    >>> state = create_state({"student": Linear().init(jax.random.key(0), images)["params"]},
    ...                      {"student": {}}, tx)
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> step = jit_train_step(make_train_step(Networks(student=Linear()), METHODS["erm"], tx, None),
    ...                       mesh, state, {})
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
