"""The projector p in Flax NNX: `NNXProjector`, the counterpart of the Linen `Projector`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dett_jax.models.projector import PROJECTORS


class NNXProjector(nnx.Module):
  """Maps a student feature map `[b, h, w, in_channels]` to `[b, h, w, teacher_channels]`.

  The Flax NNX counterpart of `Projector`, with the same kinds, computation, parameter
  shapes and parameter names (so `nnx.state(projector)` as a pure dict is the Linen
  projector's `params` and `batch_stats` merged, and either loads into the other):
  "identity" (no parameters; the channels must already match), "linear" (a 1x1
  convolution `conv`), "simkd" (1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv-BN-ReLU with
  bottleneck width `teacher_channels // factor`; `Conv_0..2`, `BatchNorm_0..2`) or
  "simkd_dw" (the same with a depthwise 3x3). `dtype` is the computation dtype;
  parameters and the output are float32.

  Call it as `projector(student_map, train=...)`: with BatchNorm, training mode updates its
  statistics in place. Put it inside your NNX student (then `dett_loss(..., projector=None)`)
  or call it in `student_fn` after the backbone.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from dett_jax import NNXProjector
    >>> projector = NNXProjector("simkd", in_channels=16, teacher_channels=64, rngs=nnx.Rngs(0))
    >>> projector(jnp.ones((2, 4, 4, 16)), train=True).shape
    (2, 4, 4, 64)
    >>> projector.Conv_1.kernel.shape, projector.BatchNorm_2.mean.shape     # bottleneck width 32
    ((3, 3, 32, 32), (64,))
  """

  def __init__(self, kind: str, in_channels: int, teacher_channels: int, factor: int = 2, *,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if kind not in PROJECTORS:
      raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTORS}")
    if kind == "identity" and in_channels != teacher_channels:
      raise ValueError(
          f"identity projector needs equal channels; student has {in_channels}, teacher "
          f"{teacher_channels}: choose distill.projector=linear or simkd")
    self.kind, self.in_channels, self.teacher_channels = kind, in_channels, teacher_channels
    if kind == "linear":
      self.conv = nnx.Conv(in_channels, teacher_channels, (1, 1), dtype=dtype, rngs=rngs)
    elif kind in ("simkd", "simkd_dw"):
      mid = max(1, teacher_channels // factor)
      conv = functools.partial(nnx.Conv, use_bias=False, dtype=dtype, rngs=rngs)
      norm = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
      self.Conv_0, self.BatchNorm_0 = conv(in_channels, mid, (1, 1)), norm(mid)
      self.Conv_1 = conv(mid, mid, (3, 3), feature_group_count=mid if kind == "simkd_dw" else 1)
      self.BatchNorm_1 = norm(mid)
      self.Conv_2, self.BatchNorm_2 = conv(mid, teacher_channels, (1, 1)), norm(teacher_channels)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`p(x)`, float32 `[b, h, w, teacher_channels]`; `train` uses and updates the batch
    statistics of the BatchNorm layers."""
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"the projector takes {self.in_channels} channels, got {x.shape[-1]}")
    if self.kind == "identity":
      return x.astype(jnp.float32)
    if self.kind == "linear":
      return self.conv(x).astype(jnp.float32)
    for k in range(3):
      conv, norm = getattr(self, f"Conv_{k}"), getattr(self, f"BatchNorm_{k}")
      x = nnx.relu(norm(conv(x), use_running_average=not train))
    return x.astype(jnp.float32)
