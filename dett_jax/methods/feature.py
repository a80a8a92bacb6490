"""Feature matching with a (transplanted) head: DeTT and its ablations and variants.

The student backbone's feature map goes through a projector p into the teacher's feature
space; the loss is the example-weighted MSE to the teacher's feature map (docs/design.md,
"The method"). Prediction is a head on the pooled projected map: the teacher's, frozen
(transplanted), or one the method trains.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dett_jax import objectives
from dett_jax.methods.base import (Method, Setup, apply_module, example_weights, model_inputs,
                                   pool)
from dett_jax.models.projector import align_spatial
from dett_jax.transplant import dense_apply

Tree = Any
MATCHES = ("map", "pooled")


def apply_projector(projector: nn.Module | None, params: Tree, collections: Tree,
                    feature_map: jax.Array, train: bool) -> tuple[jax.Array, Tree]:
  """p(feature_map) (float32) and the projector's new collections (e.g.
  `{"batch_stats": ...}`). `projector=None` is the identity.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dett_jax import Projector, apply_projector
    >>> projector = Projector("linear", teacher_channels=6)
    >>> variables = projector.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    >>> projected, _ = apply_projector(projector, variables["params"], {}, jnp.ones((2, 4, 4, 3)), False)
    >>> projected.shape
    (2, 4, 4, 6)
  """
  if projector is None:
    return feature_map.astype(jnp.float32), collections
  projected, collections = apply_module(projector, params, collections, feature_map, train)
  return projected.astype(jnp.float32), collections


def matched_feature_loss(projected: jax.Array, teacher_map: jax.Array, weights: jax.Array,
                         match: str = "map", scale: jax.Array | None = None,
                         pool_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """`objectives.feature_loss` after aligning the maps (image maps `[b, h, w, c]` are
  average-pooled to the smaller size, `align_spatial`); `match="pooled"` compares the
  pooled features (`pool_fn`, default: the mean over the non-channel axes). `scale` `[c]`
  multiplies both per channel first (`dett_std`: 1 / the teacher feature's standard
  deviation); None: DeTT's plain MSE.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import matched_feature_loss
    >>> float(matched_feature_loss(jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 2, 2, 3)), jnp.ones(2)))
    1.0
  """
  if match not in MATCHES:
    raise ValueError(f"match={match!r}; choose one of {MATCHES}")
  student_map, teacher_map = projected, teacher_map
  if student_map.ndim == 4:
    student_map, teacher_map = align_spatial(student_map, teacher_map)
  if match == "pooled":
    student_map, teacher_map = (pool(None, student_map), pool(None, teacher_map)) if pool_fn is None \
        else (pool_fn(student_map), pool_fn(teacher_map))
  if scale is not None:
    scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    student_map, teacher_map = student_map * scale, teacher_map * scale
  return objectives.feature_loss(student_map, teacher_map, weights)


def transplanted_logits(head: Mapping[str, jax.Array], projected: jax.Array,
                        pool_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """h_T(pool(projected)): logits `[b, k]` of the head on the pooled projected map.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import transplanted_logits
    >>> head = {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}
    >>> transplanted_logits(head, jnp.ones((2, 4, 4, 6))).shape
    (2, 3)
  """
  pooled = pool(None, projected) if pool_fn is None else pool_fn(projected)
  return dense_apply(head, pooled)


class FeatureMatching(Method):
  """DeTT (`dett`): the reweighted feature MSE, the teacher's head transplanted, frozen.

  Class attributes of the variants: `transplant` (False: the method trains its own head,
  zero-initialised, with cross-entropy on the detached pooled features, so the features
  train as in DeTT), `head_term` (adds `distill.head_weight` x the MSE between the
  transplanted head's logits on the projected student and the teacher's logits:
  `objectives.head_space_loss`), `standardize` (both maps divided per channel by the
  teacher feature's training-set standard deviation, `frozen["feature_scale"]`).
  Settings: `distill.match` ("map" / "pooled"); for text encoders `distill.hidden_weight`
  > 0 adds that weight x the MSE between the masked means over real tokens of the
  student's and the teacher's last hidden states (the student's through a Dense
  `params["hidden_projector"]` to the teacher's width).
  """

  name = "dett"
  needs_teacher = True
  reweight = True
  student_head = False
  no_transplant = "dett_no_transplant"
  transplant = True
  head_term = False
  standardize = False

  def _pool(self, projected: jax.Array) -> jax.Array:
    return pool(self.models.teacher, projected)  # the map lives in the teacher's space

  def init(self, rng, student, setup: Setup):
    state = super().init(rng, student, setup)
    shape = jax.eval_shape(lambda v: self.models.student.apply(
        v, setup.example_input())["feature_map"], student)
    projector = (self.models.projector.init(rng, jnp.zeros(shape.shape))
                 if self.models.projector is not None else {})
    state["params"]["projector"] = projector.get("params", {})
    state["collections"]["projector"] = {k: v for k, v in projector.items() if k != "params"}
    if not self.transplant:
      state["params"]["head"] = jax.tree.map(jnp.zeros_like, setup.teacher_head)
    if self._hidden_weight():
      hidden = jax.eval_shape(lambda v: self.models.student.apply(
          v, setup.example_input())["hidden_mean"], student)
      width = self.models.projector.teacher_channels if self.models.projector else hidden.shape[-1]
      state["params"]["hidden_projector"] = nn.Dense(width).init(
          jax.random.fold_in(rng, 1), jnp.zeros(hidden.shape))["params"]
    return state

  def _hidden_weight(self) -> float:
    """`distill.hidden_weight`; 0 without a config or, in a hand-built config written
    before the field existed (0.2.0), without the field."""
    if self.config is None:
      return 0.0
    return float(self.config.distill.get("hidden_weight", 0.0))

  def frozen(self, setup: Setup):
    out = {"head": setup.teacher_head} if self.transplant else {}
    if self.standardize:
      out["feature_scale"] = setup.feature_scale()
    return out

  def forward(self, params, collections, batch, frozen, train, rng=None):
    out, student = apply_module(self.models.student, params["student"], collections["student"],
                                model_inputs(batch), train, rng)
    projected, projector = apply_projector(self.models.projector, params["projector"],
                                           collections["projector"], out["feature_map"], train)
    pooled = self._pool(projected)
    # Without transplant, the head learns on the matched features only (no gradient into
    # the backbone), so the features train exactly as in DeTT.
    head = frozen["head"] if self.transplant else params["head"]
    logits = dense_apply(head, pooled if self.transplant else jax.lax.stop_gradient(pooled))
    outputs = {"logits": logits, "projected": projected, "pooled": pooled}
    if "hidden_projector" in params:  # text: the matched hidden-state mean
      outputs["hidden"] = nn.Dense(params["hidden_projector"]["kernel"].shape[-1]).apply(
          {"params": params["hidden_projector"]}, out["hidden_mean"]).astype(jnp.float32)
    return outputs, {**collections, "student": student, "projector": projector}

  def objective(self, outputs: dict, batch, frozen) -> tuple[jax.Array, dict]:
    """(loss, parts) of the student's `outputs` against the batch's teacher outputs."""
    weights, settings = example_weights(batch), self.config.distill
    if self.standardize and "feature_scale" not in frozen:
      raise KeyError(f"method {self.name} needs frozen['feature_scale'] (1 / the teacher "
                     "feature's per-channel standard deviation; see Method.frozen)")
    scale = frozen["feature_scale"] if self.standardize else None
    loss = matched_feature_loss(outputs["projected"], batch["teacher_feature_map"], weights,
                                settings.match, scale, self._pool)
    parts = {"feature_loss": loss}
    if "hidden" in outputs:  # text: the last hidden states' masked means matched too
      parts["hidden_loss"] = objectives.feature_loss(outputs["hidden"],
                                                     batch["teacher_hidden_mean"], weights)
      loss = loss + self._hidden_weight() * parts["hidden_loss"]
    if self.head_term:  # matching that sees the head: the error through h_T
      parts["head_loss"] = objectives.head_space_loss(outputs["logits"], batch["teacher_logits"],
                                                      weights)
      loss = loss + settings.head_weight * parts["head_loss"]
    if not self.transplant:
      parts["ce_loss"] = objectives.weighted_mean(
          objectives.cross_entropy(outputs["logits"], batch["label"]), weights)
      loss = loss + parts["ce_loss"]
    return loss, parts

  def loss(self, params, collections, batch, frozen, rng=None):
    out, collections = self.forward(params, collections, batch, frozen, True, rng)
    loss, parts = self.objective(out, batch, frozen)
    return self.finish(loss, out, collections, batch, **parts)


class SimKD(FeatureMatching):
  """SimKD: transplant and feature matching without the error set's reweighting."""

  name = "simkd"
  reweight = False
  no_transplant = None


class DeTTNoTransplant(FeatureMatching):
  """DeTT's ablation that trains its own head instead of transplanting the teacher's."""

  name = "dett_no_transplant"
  transplant = False
  no_transplant = None


class DeTTHead(FeatureMatching):
  """DeTT whose matching also sees the head (`head_term`)."""

  name = "dett_head"
  head_term = True
  no_transplant = None


class DeTTStd(FeatureMatching):
  """DeTT on per-channel standardised feature maps (`standardize`)."""

  name = "dett_std"
  standardize = True
  no_transplant = None
