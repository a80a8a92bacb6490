"""DeTT as one pure train step for any Flax model that returns its feature map.

The student is taken as a pure function, so the same step serves a Linen model (via
`apply`), an NNX model (via `nnx.split` / `nnx.merge`) or anything else:

  student_fn(params, model_state, images, train) -> (feature_map [b, h, w, c], new_model_state)

One step (DESIGN.md section 2, steps 4-6): student feature map -> projector p ->
weighted MSE to the teacher's feature map (per-example weights from the batch; the
teacher under stop_gradient) -> gradient update of the student and projector. The
transplanted head h_T is never trained: it only turns the pooled projected features into
logits, for accuracy. The bundled trainer (`dett_jax.training.steps`) uses the same
projector and loss functions below.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dett_jax.models.projector import align_spatial
from dett_jax.objectives import feature_loss
from dett_jax.transplant import dense_apply

Tree = Any
Batch = Mapping[str, jax.Array]
MATCHES = ("map", "pooled")


class StudentFn(Protocol):
  """`(params, model_state, images [b, h, w, 3], train) -> (feature_map [b, h', w', c], model_state)`."""

  def __call__(self, params: Tree, model_state: Tree, images: jax.Array,
               train: bool) -> tuple[jax.Array, Tree]: ...


TeacherFn = Callable[[Tree, jax.Array], jax.Array]
"""`(teacher_variables, images [b, h, w, 3]) -> feature_map [b, h', w', c]`, inference mode."""


# ---------------------------------------------------------------------------
# The pieces (shared with the bundled trainer).
# ---------------------------------------------------------------------------

def apply_projector(projector: nn.Module | None, params: Tree, state: Tree,
                    feature_map: jax.Array, train: bool) -> tuple[jax.Array, Tree]:
  """p(feature_map) `[b, h, w, c_t]` (float32) and the projector's new `batch_stats`.

  `projector=None` is the identity (no parameters, no state).
  """
  if projector is None:
    return feature_map.astype(jnp.float32), state
  variables = {"params": params, "batch_stats": state}
  if not train:
    return projector.apply(variables, feature_map, train=False), state
  projected, updates = projector.apply(variables, feature_map, train=True, mutable=["batch_stats"])
  return projected, updates.get("batch_stats", state)


def matched_feature_loss(projected: jax.Array, teacher_map: jax.Array, weights: jax.Array,
                         match: str = "map", scale: jax.Array | None = None) -> jax.Array:
  """`feature_loss` after `align_spatial`; `match="pooled"` compares the pooled features.

  `scale` `[c]`: both maps are multiplied by it per channel first (e.g. 1 / the teacher
  feature's standard deviation over the training set: `dett_std`); None: DeTT's plain MSE.
  """
  student_map, teacher_map = align_spatial(projected, teacher_map)
  if match == "pooled":
    student_map, teacher_map = jnp.mean(student_map, axis=(1, 2)), jnp.mean(teacher_map, axis=(1, 2))
  if scale is not None:
    scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    student_map, teacher_map = student_map * scale, teacher_map * scale
  return feature_loss(student_map, teacher_map, weights)


def transplanted_logits(head: Mapping[str, jax.Array], projected: jax.Array) -> jax.Array:
  """h_T(global_avg_pool(projected)): logits `[b, k]` from a projected map `[b, h, w, c_t]`."""
  return dense_apply(head, jnp.mean(projected, axis=(1, 2)))


def _head(params: Tree, frozen: Mapping[str, Any]) -> Mapping[str, jax.Array]:
  if "head" in frozen:
    return frozen["head"]
  if isinstance(params, Mapping) and "head" in params:
    return params["head"]
  raise KeyError("no transplanted head: pass it as frozen['head'], or keep it in params['head'] "
                 "and freeze it with dett_jax.freeze")


def _forward(student_fn: StudentFn, projector: nn.Module | None, params: Tree,
             model_state: Mapping[str, Tree], images: jax.Array,
             train: bool) -> tuple[jax.Array, dict[str, Tree]]:
  feature_map, student_state = student_fn(params["student"], model_state.get("student", {}),
                                          images, train)
  projected, projector_state = apply_projector(projector, params.get("projector", {}),
                                               model_state.get("projector", {}), feature_map, train)
  return projected, {**model_state, "student": student_state, "projector": projector_state}


# ---------------------------------------------------------------------------
# The public step.
# ---------------------------------------------------------------------------

@flax.struct.dataclass
class DeTTState:
  """What a DeTT step trains: parameters, non-trained model state, optimizer state.

  Attributes:
    params: `{"student": ..., "projector": ...}`, and `"head"` when the transplanted head
      lives in this tree (then freeze it with `freeze`).
    model_state: `{"student": ..., "projector": ...}`: state that is not trained by
      gradients (BatchNorm statistics; `{}` for none).
    opt_state: the optimizer state of `params`.
    step: number of steps taken, int32 scalar.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dett_jax import DeTTState
    >>> params = {"student": {"w": jnp.ones(3)}, "projector": {}}
    >>> state = DeTTState.create(params, {"student": {}, "projector": {}}, optax.sgd(0.1))
    >>> int(state.step), state.params["student"]["w"].shape
    (0, (3,))
  """

  params: Tree
  model_state: Tree
  opt_state: optax.OptState
  step: jax.Array

  @classmethod
  def create(cls, params: Tree, model_state: Tree, tx: optax.GradientTransformation) -> "DeTTState":
    """The state at step 0, with `tx.init(params)`."""
    return cls(params=params, model_state=model_state, opt_state=tx.init(params),
               step=jnp.zeros((), jnp.int32))


def make_dett_step(student_fn: StudentFn, tx: optax.GradientTransformation, *,
                   projector: nn.Module | None = None, teacher_fn: TeacherFn | None = None,
                   match: str = "map"
                   ) -> Callable[[DeTTState, Batch, Mapping[str, Any]], tuple[DeTTState, dict]]:
  """Returns a pure DeTT train step `step(state, batch, frozen) -> (state, metrics)`.

  The step computes the student's feature map with `student_fn(state.params["student"],
  state.model_state["student"], images, True)`, projects it with `projector` (a Linen
  module such as `Projector`, with variables `params["projector"]` and
  `model_state["projector"]`; None for the identity), and minimises the weighted
  `feature_loss` to the teacher's feature map (after `align_spatial`). It is a pure
  function: wrap it in `jax.jit` (with your own shardings and donation).

  Args:
    student_fn: `(params, model_state, images [b, h, w, 3], train) -> (feature_map
      [b, h', w', c_s], new_model_state)`. For a Linen model: `model.apply(...,
      mutable=["batch_stats"] if train else False)`; for NNX: `nnx.merge(graphdef,
      params, model_state)`, call the module, return `nnx.state(module, nnx.BatchStat)`.
    tx: the optimizer of `state.params`.
    projector: Linen module mapping `[b, h', w', c_s]` to the teacher's `[b, h'', w'', c_t]`
      (e.g. `Projector("simkd", c_t)`), or None (identity).
    teacher_fn: `(frozen["teacher"], images) -> teacher feature map`, run in inference mode
      under stop_gradient. None: each batch carries `teacher_feature_map` (precomputed).
    match: "map" (DeTT) or "pooled" (match after global average pooling).

  The batch holds `image [b, h, w, 3]` and optionally `weight [b]` (error-set weights;
  default 1), `mask [b]` (0 for padding) and `label [b]` (for `train_acc`); `frozen` holds
  `teacher` (the teacher's variables, for `teacher_fn`) and `head` (the transplanted
  Dense subtree `{"kernel": [c_t, k], "bias": [k]}`; if absent, `params["head"]`).

  Returns:
    `step`; its metrics are `loss` (the weighted feature loss), `train_acc` (of the
    transplanted head on the projected features; 0 without labels) and `grad_norm`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from dett_jax import DeTTState, Projector, make_dett_step
    >>> student, teacher = nn.Conv(4, (3, 3)), nn.Conv(6, (3, 3))
    >>> images = jnp.ones((2, 8, 8, 3))
    >>> student_fn = lambda p, s, x, train: (student.apply({"params": p}, x), s)
    >>> teacher_fn = lambda v, x: teacher.apply(v, x)
    >>> projector = Projector("linear", teacher_channels=6)
    >>> params = {"student": student.init(jax.random.key(0), images)["params"],
    ...           "projector": projector.init(jax.random.key(1), jnp.ones((2, 8, 8, 4)))["params"]}
    >>> frozen = {"teacher": teacher.init(jax.random.key(2), images),
    ...           "head": {"kernel": jnp.ones((6, 2)), "bias": jnp.zeros(2)}}
    >>> tx = optax.adam(1e-2)
    >>> step = jax.jit(make_dett_step(student_fn, tx, projector=projector, teacher_fn=teacher_fn))
    >>> state = DeTTState.create(params, {"student": {}, "projector": {}}, tx)
    >>> batch = {"image": images, "weight": jnp.array([1.0, 20.0]), "label": jnp.array([0, 1])}
    >>> state, metrics = step(state, batch, frozen)
    >>> sorted(metrics), int(state.step)
    (['grad_norm', 'loss', 'train_acc'], 1)
  """
  if match not in MATCHES:
    raise ValueError(f"match={match!r}; choose one of {MATCHES}")

  def step(state: DeTTState, batch: Batch, frozen: Mapping[str, Any]) -> tuple[DeTTState, dict]:
    images = batch["image"]
    weights = _weights(batch, images.shape[0])
    teacher_map = _teacher_map(teacher_fn, frozen, batch)

    def loss_fn(params):
      # Rebuilt in this (differentiation) trace: NNX Variables in the state may only be
      # updated (BatchNorm statistics) in the trace that created them.
      model_state = jax.tree.map(lambda x: x, state.model_state)
      projected, model_state = _forward(student_fn, projector, params, model_state,
                                        images, train=True)
      return matched_feature_loss(projected, teacher_map, weights, match), (projected, model_state)

    (loss, (projected, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logits = transplanted_logits(_head(state.params, frozen), projected)
    metrics = {"loss": loss, "train_acc": _accuracy(logits, batch), "grad_norm": optax.tree.norm(grads)}
    return state.replace(params=params, model_state=model_state, opt_state=opt_state,
                         step=state.step + 1), metrics

  return step


def make_dett_predict(student_fn: StudentFn, projector: nn.Module | None = None
                      ) -> Callable[[Tree, Tree, jax.Array, Mapping[str, Any]], jax.Array]:
  """Returns `predict(params, model_state, images, frozen) -> logits [b, k]` (pure).

  The DeTT student's prediction, h_T(global_avg_pool(p(f_S(x)))), in inference mode
  (`student_fn(..., train=False)`, BatchNorm running statistics). `params` and
  `model_state` are laid out as in `DeTTState`; the head is `frozen["head"]` or, if
  absent, `params["head"]`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from dett_jax import make_dett_predict
    >>> student = nn.Conv(6, (3, 3))
    >>> student_fn = lambda p, s, x, train: (student.apply({"params": p}, x), s)
    >>> images = jnp.ones((2, 8, 8, 3))
    >>> params = {"student": student.init(jax.random.key(0), images)["params"]}
    >>> head = {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}
    >>> predict = jax.jit(make_dett_predict(student_fn))
    >>> predict(params, {}, images, {"head": head}).shape
    (2, 3)
  """

  def predict(params: Tree, model_state: Tree, images: jax.Array,
              frozen: Mapping[str, Any]) -> jax.Array:
    projected, _ = _forward(student_fn, projector, params, model_state or {}, images, train=False)
    return transplanted_logits(_head(params, frozen), projected)

  return predict


def _weights(batch: Batch, size: int) -> jax.Array:
  weights = jnp.asarray(batch["weight"], jnp.float32) if "weight" in batch else jnp.ones(size)
  return weights * batch["mask"] if "mask" in batch else weights


def _teacher_map(teacher_fn: TeacherFn | None, frozen: Mapping[str, Any], batch: Batch) -> jax.Array:
  if "teacher_feature_map" in batch:
    teacher_map = batch["teacher_feature_map"]
  elif teacher_fn is None:
    raise ValueError("make_dett_step(teacher_fn=None) needs batch['teacher_feature_map']")
  else:
    teacher_map = teacher_fn(frozen["teacher"], batch["image"])
  return jax.lax.stop_gradient(jnp.asarray(teacher_map, jnp.float32))


def _accuracy(logits: jax.Array, batch: Batch) -> jax.Array:
  if "label" not in batch:
    return jnp.zeros((), jnp.float32)
  mask = batch["mask"] if "mask" in batch else jnp.ones(logits.shape[0])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask
  return jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1)
