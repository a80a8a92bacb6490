"""DeTT as a public loss for any training loop, and thin conveniences over it.

The student is taken as a pure function, so the same loss serves a Linen model (via
`apply`), an NNX model (via `nnx.split` / `nnx.merge`) or anything else:

  student_fn(params, collections, inputs, train, rng) -> (feature_map, new_collections)

`dett_loss` (docs/design.md, "The method"): student feature map -> projector p ->
example-weighted MSE to the teacher's feature map (the teacher under stop_gradient). It
returns `(loss, aux)` for `jax.value_and_grad(..., has_aux=True)`, so it drops into a
`flax.training.train_state.TrainState.apply_gradients` loop, an `nnx.Optimizer` loop or
`make_dett_step` (the guarded update of `dett_jax.training.update`). The transplanted
head h_T is never trained: it turns the pooled projected features into logits.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dett_jax.methods.base import accuracy, example_weights, model_inputs
from dett_jax.methods.feature import apply_projector, matched_feature_loss, transplanted_logits
from dett_jax.training.state import TrainState
from dett_jax.training.update import make_update

Tree = Any
Batch = Mapping[str, jax.Array]

# Deprecated alias (one minor version): the one train state is `TrainState`.
DeTTState = TrainState


class StudentFn(Protocol):
  """`(params, collections, inputs, train, rng) -> (feature_map, new_collections)`."""

  def __call__(self, params: Tree, collections: Tree, inputs: jax.Array, train: bool,
               rng: jax.Array | None) -> tuple[jax.Array, Tree]: ...


TeacherFn = Callable[[Tree, jax.Array], jax.Array]
"""`(teacher_variables, inputs) -> feature_map`, inference mode."""


def _head(params: Tree, frozen: Mapping[str, Any]) -> Mapping[str, jax.Array]:
  if "head" in frozen:
    return frozen["head"]
  if isinstance(params, Mapping) and "head" in params:
    return params["head"]
  raise KeyError("no transplanted head: pass it as frozen['head'], or keep it in params['head'] "
                 "and freeze it with dett_jax.freeze")


def _teacher_map(teacher_fn: TeacherFn | None, frozen: Mapping[str, Any], batch: Batch) -> jax.Array:
  if "teacher_feature_map" in batch:
    teacher_map = batch["teacher_feature_map"]
  elif teacher_fn is None:
    raise ValueError("dett_loss(teacher_fn=None) needs batch['teacher_feature_map']")
  else:
    teacher_map = teacher_fn(frozen["teacher"], model_inputs(batch))
  return jax.lax.stop_gradient(jnp.asarray(teacher_map, jnp.float32))


def _project(student_fn: StudentFn, projector: nn.Module | None, params: Tree,
             collections: Mapping[str, Tree], inputs: jax.Array, train: bool,
             rng: jax.Array | None) -> tuple[jax.Array, dict[str, Tree]]:
  feature_map, student = student_fn(params["student"], collections.get("student", {}),
                                    inputs, train, rng)
  projected, projector_state = apply_projector(projector, params.get("projector", {}),
                                               collections.get("projector", {}), feature_map,
                                               train)
  return projected, {**collections, "student": student, "projector": projector_state}


def dett_loss(params: Tree, collections: Tree, batch: Batch, frozen: Mapping[str, Any],
              rng: jax.Array | None = None, *, student_fn: StudentFn,
              projector: nn.Module | None = None, teacher_fn: TeacherFn | None = None,
              match: str = "map") -> tuple[jax.Array, dict]:
  """DeTT's loss on one batch: `(loss, aux)`, differentiable in `params`.

  Args:
    params: `{"student": ..., "projector": ...}` (and `"head"` when the transplanted head
      lives here; then freeze it, e.g. with `dett_jax.freeze`).
    collections: `{"student": ..., "projector": ...}`: state not trained by gradients
      (Flax collections such as `{"batch_stats": ...}`; `{}` for none).
    batch: `image` (the inputs), optional `weight [b]` (error-set weights; default 1),
      `mask [b]` (0 for padding), `label [b]` (for `train_acc`) and
      `teacher_feature_map` (precomputed; else `teacher_fn` runs).
    frozen: `head` (the transplanted Dense `{"kernel": [c_t, k], "bias": [k]}`; if absent,
      `params["head"]`) and `teacher` (variables for `teacher_fn`).
    rng: a key for the student's randomness (dropout), or None.
    student_fn: see the module docstring.
    projector: Linen module from the student's map to the teacher's (e.g.
      `Projector("simkd", c_t)`), or None (the identity; e.g. an NNX projector inside
      `student_fn`).
    teacher_fn: `(frozen["teacher"], inputs) -> teacher feature map`, or None.
    match: "map" (DeTT) or "pooled" (match after pooling).

  Returns:
    The weighted feature loss and `aux = {"collections": new collections, "metrics":
    {"train_acc": ...}, "logits": [b, k]}` (the transplanted head's logits).

  Examples:
    >>> import functools, flax.linen as nn, jax, jax.numpy as jnp
    >>> from dett_jax import dett_loss
    >>> student, teacher = nn.Conv(6, (3, 3)), nn.Conv(6, (3, 3))
    >>> images = jnp.ones((2, 8, 8, 3))
    >>> student_fn = lambda p, c, x, train, rng: (student.apply({"params": p}, x), c)
    >>> frozen = {"teacher": teacher.init(jax.random.key(1), images),
    ...           "head": {"kernel": jnp.ones((6, 2)), "bias": jnp.zeros(2)}}
    >>> loss_fn = functools.partial(dett_loss, student_fn=student_fn,
    ...                             teacher_fn=lambda v, x: teacher.apply(v, x))
    >>> params = {"student": student.init(jax.random.key(0), images)["params"]}
    >>> (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...     params, {}, {"image": images, "weight": jnp.array([1.0, 20.0])}, frozen)
    >>> loss.shape, aux["logits"].shape, sorted(grads)
    ((), (2, 2), ['student'])
  """
  teacher_map = _teacher_map(teacher_fn, frozen, batch)
  # Rebuilt in this (differentiation) trace: NNX Variables may only be updated
  # (BatchNorm statistics) in the trace that created them.
  collections = jax.tree.map(lambda x: x, collections)
  projected, collections = _project(student_fn, projector, params, collections, model_inputs(batch),
                                    True, rng)
  loss = matched_feature_loss(projected, teacher_map, example_weights(batch), match)
  logits = transplanted_logits(_head(params, frozen), projected)
  return loss, {"collections": collections, "metrics": {"train_acc": accuracy(logits, batch)},
                "logits": logits}


def make_dett_step(student_fn: StudentFn, tx: optax.GradientTransformation, *,
                   projector: nn.Module | None = None, teacher_fn: TeacherFn | None = None,
                   match: str = "map", rng: jax.Array | None = None
                   ) -> Callable[[TrainState, Batch, Mapping[str, Any]], tuple[TrainState, dict]]:
  """`step(state, batch, frozen) -> (state, metrics)`: `dett_loss` under the guarded
  update (`make_update`; a non-finite loss or gradient skips the update). Pure: wrap it
  in `jax.jit`. Metrics: `loss`, `train_acc`, `grad_norm`, `nonfinite_loss`,
  `nonfinite_grad`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from dett_jax import Projector, TrainState, make_dett_step
    >>> student, teacher = nn.Conv(4, (3, 3)), nn.Conv(6, (3, 3))
    >>> images = jnp.ones((2, 8, 8, 3))
    >>> student_fn = lambda p, c, x, train, rng: (student.apply({"params": p}, x), c)
    >>> projector = Projector("linear", teacher_channels=6)
    >>> params = {"student": student.init(jax.random.key(0), images)["params"],
    ...           "projector": projector.init(jax.random.key(1), jnp.ones((2, 8, 8, 4)))["params"]}
    >>> frozen = {"teacher": teacher.init(jax.random.key(2), images),
    ...           "head": {"kernel": jnp.ones((6, 2)), "bias": jnp.zeros(2)}}
    >>> tx = optax.adam(1e-2)
    >>> step = jax.jit(make_dett_step(student_fn, tx, projector=projector,
    ...                               teacher_fn=lambda v, x: teacher.apply(v, x)))
    >>> state = TrainState.create(params, {"student": {}, "projector": {}}, tx)
    >>> batch = {"image": images, "weight": jnp.array([1.0, 20.0]), "label": jnp.array([0, 1])}
    >>> state, metrics = step(state, batch, frozen)
    >>> int(state.step), sorted(metrics)[:3]
    (1, ['grad_norm', 'loss', 'nonfinite_grad'])
  """
  def loss_fn(params, collections, batch, frozen, step_rng):
    return dett_loss(params, collections, batch, frozen, step_rng, student_fn=student_fn,
                     projector=projector, teacher_fn=teacher_fn, match=match)

  return make_update(loss_fn, tx, rng)


def make_dett_predict(student_fn: StudentFn, projector: nn.Module | None = None
                      ) -> Callable[[Tree, Tree, jax.Array, Mapping[str, Any]], jax.Array]:
  """`predict(params, collections, inputs, frozen) -> logits [b, k]` (pure): the DeTT
  student's h_T(pool(p(f_S(x)))) in inference mode (`student_fn(..., train=False)`).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from dett_jax import make_dett_predict
    >>> student = nn.Conv(6, (3, 3))
    >>> student_fn = lambda p, c, x, train, rng: (student.apply({"params": p}, x), c)
    >>> images = jnp.ones((2, 8, 8, 3))
    >>> params = {"student": student.init(jax.random.key(0), images)["params"]}
    >>> head = {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}
    >>> jax.jit(make_dett_predict(student_fn))(params, {}, images, {"head": head}).shape
    (2, 3)
  """

  def predict(params: Tree, collections: Tree, inputs: jax.Array,
              frozen: Mapping[str, Any]) -> jax.Array:
    projected, _ = _project(student_fn, projector, params, collections or {}, inputs, False, None)
    return transplanted_logits(_head(params, frozen), projected)

  return predict
