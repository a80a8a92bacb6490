"""Projectors p: student feature map -> teacher feature shape (docs/design.md, "Projector")."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dett_jax.models.backend import Backend

PROJECTORS = ("identity", "linear", "simkd", "simkd_dw")


def align_spatial(x: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Average-pools the larger of two `[b, h, w, c]` maps down to the smaller's h, w.

  The sizes must divide (ValueError otherwise); channels may differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dett_jax import align_spatial
    >>> student_map, teacher_map = align_spatial(jnp.ones((2, 8, 8, 16)), jnp.ones((2, 4, 4, 64)))
    >>> student_map.shape, teacher_map.shape
    ((2, 4, 4, 16), (2, 4, 4, 64))
  """
  def pool_to(a, h, w):
    ah, aw = a.shape[1:3]
    if (ah, aw) == (h, w):
      return a
    if ah % h or aw % w:
      raise ValueError(f"cannot average-pool a {ah}x{aw} map to {h}x{w}: sizes must divide")
    return nn.avg_pool(a, (ah // h, aw // w), strides=(ah // h, aw // w))
  h = min(x.shape[1], y.shape[1])
  w = min(x.shape[2], y.shape[2])
  return pool_to(x, h, w), pool_to(y, h, w)


class Projector(nn.Module):
  """Maps a student feature map `[b, h, w, c_s]` to `[b, h, w, teacher_channels]`, or a
  text encoder's vector `[b, c_s]` (or token map `[b, t, c_s]`) to `[..., teacher_channels]`.

  kind: "identity" (shapes must already match), "linear" (1x1 conv), "simkd"
  (1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv-BN-ReLU; bottleneck width
  teacher_channels // factor) or "simkd_dw" (the same with a depthwise 3x3). On vectors
  and token maps (no spatial axes) "linear" is one Dense, and "simkd"/"simkd_dw" are
  Dense-LayerNorm-ReLU twice, then a Dense to the teacher's width with no activation (a
  text teacher's pooled feature is tanh- or ReLU-valued, or a hidden state, so the
  output is not clipped at 0).
  dtype: activation/matmul dtype (e.g. bfloat16); parameters stay float32 and the
  output is float32, so the feature loss is computed in float32.
  backend: how the convolutions are computed on the platform
  (`dett_jax.models.backend.Backend`; parameters and function do not depend on it).

  Call it as `projector.apply(variables, student_map, train=...)`; with BatchNorm
  ("simkd", "simkd_dw") training mode needs `mutable=["batch_stats"]`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dett_jax import Projector
    >>> projector = Projector("simkd", teacher_channels=64)       # bottleneck width 32
    >>> student_map = jnp.ones((2, 4, 4, 16))
    >>> variables = jax.eval_shape(projector.init, jax.random.key(0), student_map)
    >>> sorted(variables), jax.eval_shape(projector.apply, variables, student_map).shape
    (['batch_stats', 'params'], (2, 4, 4, 64))
  """

  kind: str
  teacher_channels: int
  factor: int = 2
  dtype: Any = jnp.float32
  backend: Backend = Backend()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.kind == "identity":
      if x.shape[-1] != self.teacher_channels:
        raise ValueError(
            f"identity projector needs equal channels; student has {x.shape[-1]}, teacher "
            f"{self.teacher_channels}: choose distill.projector=linear or simkd")
      return x
    if x.ndim < 4:
      return self._tokens(x, train)
    if self.kind == "linear":
      return nn.Conv(self.teacher_channels, (1, 1), dtype=self.dtype, name="conv",
                     conv_general_dilated=self.backend.conv_fn())(x).astype(jnp.float32)
    if self.kind not in ("simkd", "simkd_dw"):
      raise ValueError(f"unknown projector {self.kind!r}; choose one of {PROJECTORS}")
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype)
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype,
        conv_general_dilated=self.backend.conv_fn())
    mid = max(1, self.teacher_channels // self.factor)
    x = nn.relu(norm()(conv(mid, (1, 1))(x)))
    groups = mid if self.kind == "simkd_dw" else 1
    x = nn.relu(norm()(conv(mid, (3, 3), feature_group_count=groups)(x)))
    x = nn.relu(norm()(conv(self.teacher_channels, (1, 1))(x)))
    return x.astype(jnp.float32)

  def _tokens(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """The projector on `[b, c]` vectors or `[b, t, c]` token maps (Dense layers per token)."""
    del train  # no BatchNorm: statistics over padded tokens would mix in padding
    if self.kind == "linear":
      return nn.Dense(self.teacher_channels, dtype=self.dtype, name="dense")(x).astype(jnp.float32)
    if self.kind not in ("simkd", "simkd_dw"):
      raise ValueError(f"unknown projector {self.kind!r}; choose one of {PROJECTORS}")
    mid = max(1, self.teacher_channels // self.factor)
    for _ in range(2):
      x = nn.relu(nn.LayerNorm(dtype=self.dtype)(nn.Dense(mid, dtype=self.dtype)(x)))
    return nn.Dense(self.teacher_channels, dtype=self.dtype)(x).astype(jnp.float32)
