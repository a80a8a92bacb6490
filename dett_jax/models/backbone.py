"""The backbone protocol: what a teacher or student model provides to distillation.

`ResNet` (`dett_jax.models.resnet`) is the image implementation; anything else (a text
encoder, say) satisfies the same protocol. Everything modality-specific (NHWC maps,
spatial pooling, crop augmentation) stays inside the backbone.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax.numpy as jnp


@runtime_checkable
class Backbone(Protocol):
  """A Flax module mapping inputs to the feature map its head reads, pooled, and logits.

  `__call__(inputs, train=False)` returns a dict with
    feature_map: what the head reads before pooling (`[b, h, w, c]` for images,
      `[b, t, c]` for text);
    features: `pool(feature_map)`, `[b, c]`;
    logits: `[b, k]`, when the model has a head.
  `head_name` names the head's parameter subtree (`params[head_name]`, a Dense
  `{"kernel": [c, k], "bias": [k]}`), and `pool` is the model's one definition of
  pooling, so a head transplanted onto another map pools it the same way.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax.models.backbone import Backbone
    >>> from dett_jax.models.resnet import create_resnet
    >>> model = create_resnet(10, 2, width=0.0625, stem="small")
    >>> isinstance(model, Backbone), model.head_name
    (True, 'head')
    >>> model.pool(jnp.ones((2, 4, 4, 32))).shape
    (2, 32)
  """

  head_name: ClassVar[str]

  def __call__(self, inputs: Any, train: bool = False) -> dict[str, jnp.ndarray]:
    ...

  def pool(self, feature_map: jnp.ndarray) -> jnp.ndarray:
    ...


def pool_features(model: Any, feature_map: jnp.ndarray) -> jnp.ndarray:
  """`model.pool(feature_map)`; for a model without `pool`, the mean over the axes between
  batch and channels (`[b, ..., c]` -> `[b, c]`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax.models.backbone import pool_features
    >>> pool_features(object(), jnp.ones((2, 5, 8))).shape       # [b, t, c] -> [b, c]
    (2, 8)
  """
  pool = getattr(model, "pool", None)
  if callable(pool):
    return pool(feature_map)
  return jnp.mean(feature_map, axis=tuple(range(1, feature_map.ndim - 1)))
