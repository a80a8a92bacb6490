"""What every method is: a `Method` subclass declaring its needs and providing its loss.

A method is constructed with the models it trains and the run's config,
`method = cls(models, config)`, and offers, as pure functions of pytrees:

  init(rng, student, setup) -> {"params": ..., "collections": ...}   its trained state
  frozen(setup) -> {...}          what it reads but never trains (e.g. a transplanted head)
  forward(params, collections, batch, frozen, train, rng) -> (outputs, collections)
  loss(params, collections, batch, frozen, rng) -> (loss, aux)     (`training.update.LossFn`)

`outputs` holds `logits` `[b, k]` (what evaluation scores) and, for methods that match
feature maps, `projected` (the student map in the teacher's feature space). The trainer,
sweeps and evaluation read only these and the class's declarations (`needs_teacher`,
`reweight`, `student_head`); nothing branches on a method's name. A method defined
outside the package is registered with `dett_jax.methods.register` (docs/design.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dett_jax.transplant import dense_apply

Tree = Any
Batch = Mapping[str, jax.Array]
TEACHER_KEYS = ("teacher_feature_map", "teacher_logits")
INPUT_KEYS = ("image", "tokens")  # a batch's model input: images, or token arrays [b, 3, t]


def model_inputs(batch: Batch) -> jax.Array:
  """The model input of `batch`: `batch["image"]` (`[b, h, w, 3]` float32), or for text
  `batch["tokens"]` (int32 `[b, 3, t]`: input ids, token types, attention mask).

  Examples:
    >>> import numpy as np
    >>> from dett_jax.methods.base import model_inputs
    >>> model_inputs({"tokens": np.zeros((2, 3, 8), np.int32), "label": np.zeros(2)}).shape
    (2, 3, 8)
  """
  for key in INPUT_KEYS:
    if key in batch:
      return batch[key]
  raise KeyError(f"the batch has no model input: give one of {', '.join(INPUT_KEYS)} "
                 f"(it has {', '.join(batch)})")


@dataclasses.dataclass(frozen=True)
class Models:
  """The Flax modules a method applies (static, not traced).

  Attributes:
    student: the student backbone (`models.backbone.Backbone`): with its own classifier
      head when the method's `student_head` is True, else without (the method puts a
      projector and a head on its `feature_map`).
    projector: module mapping the student's feature map to the teacher's, or None.
    teacher: the teacher backbone (returns `feature_map` and `features`), or None.

  Examples:
    >>> from dett_jax import Models, Projector, create_resnet
    >>> models = Models(student=create_resnet(10, None, width=0.0625, stem="small"),
    ...                 projector=Projector("linear", teacher_channels=64),
    ...                 teacher=create_resnet(18, 2, width=0.125, stem="small"))
    >>> models.projector.kind
    'linear'
  """

  student: nn.Module
  projector: nn.Module | None = None
  teacher: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `Method.init` and `Method.frozen` may read about the run.

  Attributes:
    teacher_head: the distilled teacher's Dense head `{"kernel": [c, k], "bias": [k]}`.
    group_counts: training examples per group `[G]`.
    input_shape: one example's input shape (e.g. `(h, w, 3)`, or `(3, t)` for text).
    input_dtype: its dtype (float32 images, int32 tokens).
    feature_scale: `() -> [c]`, 1 / the per-channel standard deviation of the teacher's
      feature maps over the training split (computed on first call).
  """

  teacher_head: Tree
  group_counts: np.ndarray
  input_shape: tuple[int, ...]
  feature_scale: Callable[[], jax.Array] | None = None
  input_dtype: Any = jnp.float32

  def example_input(self) -> jax.Array:
    """Zeros of one example's input, batch 1 (for initialising and shape evaluation)."""
    return jnp.zeros((1,) + tuple(self.input_shape), self.input_dtype)

  @property
  def num_groups(self) -> int:
    return len(self.group_counts)


def apply_module(module: nn.Module, params: Tree, collections: Tree, inputs: jax.Array,
                 train: bool, rng: jax.Array | None = None) -> tuple[Any, Tree]:
  """`module(inputs, train=train)` with `params` and its Flax `collections` (e.g.
  `{"batch_stats": ...}`); in training, the updated collections are returned (else the
  given ones). `rng` feeds the `dropout` stream."""
  variables = {"params": params, **collections}
  rngs = {"dropout": rng} if rng is not None else None
  if train and collections:
    out, updates = module.apply(variables, inputs, train=True, mutable=list(collections),
                                rngs=rngs)
    return out, {**collections, **updates}
  return module.apply(variables, inputs, train=train, rngs=rngs), collections


def pool(model: nn.Module | None, feature_map: jax.Array) -> jax.Array:
  """The pooled features of `feature_map` as `model` pools them (`model.pool`; a model
  without one: the mean over every axis between batch and channels)."""
  if model is not None and hasattr(model, "pool"):
    return model.pool(feature_map)
  return jnp.mean(feature_map, axis=tuple(range(1, feature_map.ndim - 1)))


def teacher_outputs(models: Models, frozen: Tree, batch: Batch) -> dict[str, jax.Array]:
  """`{"teacher_feature_map", "teacher_logits"}` (and a text encoder's
  `teacher_hidden_mean`) of the teacher in inference mode
  (`frozen["teacher"]` variables, head `frozen["teacher_head"]`), gradients stopped; taken
  from the batch instead when it carries them (a teacher cache)."""
  if all(k in batch for k in TEACHER_KEYS):
    out = {k: batch[k].astype(jnp.float32) for k in TEACHER_KEYS}
  else:
    teacher = models.teacher.apply(frozen["teacher"], model_inputs(batch), train=False)
    logits = dense_apply(frozen["teacher_head"], teacher["features"])
    out = {"teacher_feature_map": teacher["feature_map"], "teacher_logits": logits}
    if "hidden_mean" in teacher:  # text encoders: the masked mean of the last hidden states
      out["teacher_hidden_mean"] = teacher["hidden_mean"]
  return jax.lax.stop_gradient(out)


def example_weights(batch: Batch) -> jax.Array:
  """`weight * mask` `[b]` (each missing one counts as 1)."""
  if "weight" in batch:
    weights = jnp.asarray(batch["weight"], jnp.float32)
  else:
    weights = jnp.ones((batch["label"] if "label" in batch else model_inputs(batch)).shape[0])
  return weights * batch["mask"] if "mask" in batch else weights


def accuracy(logits: jax.Array, batch: Batch) -> jax.Array:
  """Fraction of (unmasked) examples whose argmax is the label (0 without labels)."""
  if "label" not in batch:
    return jnp.zeros((), jnp.float32)
  mask = batch["mask"] if "mask" in batch else jnp.ones(logits.shape[0])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32) * mask
  return jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1)


class Method:
  """Base class of a method (a plug-in): declarations, hooks, and the loss.

  Class attributes (declarations the trainer reads):
    name: the registry name (`distill.methods`).
    needs_teacher: the batch must carry the teacher's outputs (`teacher_outputs`).
    reweight: trains on the error set's example weights (or upsampled data).
    student_head: the student backbone keeps its own classifier head.
    no_transplant: the name of the same method without a transplanted head, for the
      sweeps' `transplant` axis (None: the axis does not apply).

  Examples:
    A method of your own: ERM with label smoothing, registered and trained by the same
    step as every built-in method.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from dett_jax import Method, Models, TrainState, make_train_step, methods
    >>> @methods.register
    ... class SmoothERM(Method):
    ...   name = "smooth_erm"
    ...   def loss(self, params, collections, batch, frozen, rng=None):
    ...     out, collections = self.forward(params, collections, batch, frozen, True, rng)
    ...     targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], 2), 0.1)
    ...     loss = optax.softmax_cross_entropy(out["logits"], targets).mean()
    ...     return self.finish(loss, out, collections, batch)
    >>> class Linear(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return {"logits": nn.Dense(2)(x.reshape(x.shape[0], -1))}
    >>> method = methods.get("smooth_erm")(Models(student=Linear()))
    >>> images, tx = jnp.ones((4, 2, 2, 3)), optax.sgd(0.1)
    >>> state = TrainState.create({"student": Linear().init(jax.random.key(0), images)["params"]},
    ...                           {"student": {}}, tx)
    >>> batch = {"image": images, "label": jnp.array([0, 1, 0, 1])}
    >>> state, metrics = jax.jit(make_train_step(method, tx))(state, batch, {})
    >>> int(state.step), sorted(metrics)[:2]
    (1, ['grad_norm', 'loss'])
  """

  name: ClassVar[str] = ""
  needs_teacher: ClassVar[bool] = False
  reweight: ClassVar[bool] = False
  student_head: ClassVar[bool] = True
  no_transplant: ClassVar[str | None] = None

  def __init__(self, models: Models, config: Any = None):
    self.models, self.config = models, config

  def init(self, rng: jax.Array, student: Tree, setup: Setup) -> dict[str, Tree]:
    """`{"params": {"student": ...}, "collections": {"student": {...}}}` from the student
    backbone's Flax variables `student` (its head already fitted to the task)."""
    del rng, setup
    return {"params": {"student": student["params"]},
            "collections": {"student": {k: v for k, v in student.items() if k != "params"}}}

  def frozen(self, setup: Setup) -> dict[str, Tree]:
    """Entries of the frozen tree beyond the teacher's (`teacher`, `teacher_head`)."""
    del setup
    return {}

  def batch_inputs(self, batch: Batch, frozen: Tree) -> dict:
    """The batch with what the loss reads added once (shared by stacked variants): the
    teacher's outputs when `needs_teacher`."""
    if not self.needs_teacher:
      return dict(batch)
    return {**batch, **teacher_outputs(self.models, frozen, batch)}

  def forward(self, params: Tree, collections: Tree, batch: Batch, frozen: Tree, train: bool,
              rng: jax.Array | None = None) -> tuple[dict[str, jax.Array], Tree]:
    """The student's outputs (`logits`) and its new collections."""
    out, student = apply_module(self.models.student, params["student"],
                                collections["student"], model_inputs(batch), train, rng)
    return {"logits": out["logits"]}, {**collections, "student": student}

  def loss(self, params: Tree, collections: Tree, batch: Batch, frozen: Tree,
           rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """`(loss, {"collections": ..., "metrics": {...}})` on one batch."""
    raise NotImplementedError(f"method {self.name!r} defines no loss")

  def finish(self, loss: jax.Array, outputs: dict, collections: Tree, batch: Batch,
             **parts: jax.Array) -> tuple[jax.Array, dict]:
    """`(loss, aux)` with the train accuracy of `outputs["logits"]` and `parts` as metrics."""
    metrics = {"train_acc": accuracy(outputs["logits"], batch), **parts}
    return loss, {"collections": collections, "metrics": metrics}

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"
