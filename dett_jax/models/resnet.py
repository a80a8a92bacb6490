"""ResNet family in Flax Linen (basic and bottleneck blocks, depths 10/18/34/50).

`ResNet.__call__` returns a dict with the last-stage feature map
(`feature_map`, `[batch, h, w, c]`), the pooled features (`features`,
`[batch, c]`) and the logits (`logits`, `[batch, num_classes]`). The classifier
is the `nn.Dense` submodule named `head` (`ResNet.head_name`), so its parameters are
the subtree `params["head"]` and can be read out or replaced (see `dett_jax.transplant`).
`ResNet` satisfies `dett_jax.models.backbone.Backbone`; how it computes convolutions and
pools on the platform is its `backend` (`dett_jax.models.backend.Backend`).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dett_jax.models.backend import Backend

ModuleDef = Any
# Symmetric padding of 1 for 3x3 windows, as torchvision pads (not "SAME", which pads
# strided windows asymmetrically), so imported PyTorch weights compute the same function.
PAD3 = ((1, 1), (1, 1))


def _residual_add(block: nn.Module, residual: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """relu(shortcut(residual) + y); the shortcut is a strided 1x1 conv + BN when shapes differ.

  Called inside a block's compact `__call__`, so `conv_proj`/`norm_proj` belong to it.
  """
  if residual.shape != y.shape:
    residual = block.conv(y.shape[-1], (1, 1), block.strides, name="conv_proj")(residual)
    residual = block.norm(name="norm_proj")(residual)
  return nn.relu(residual + y)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-10/18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=PAD3)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=PAD3)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    return _residual_add(self, residual, y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck with 4x expansion (ResNet-50)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=PAD3)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    return _residual_add(self, residual, y)


class ResNet(nn.Module):
  """ResNet with an ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or a small-image stem.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_classes: width of the Dense head; None builds no head (no `logits` output).
    width: width multiplier; stage widths are round(64 * width * 2**i).
    stem: "imagenet" or "small" (one 3x3 stride-1 conv, no pooling; for 32-pixel images).
    dtype: activation/matmul dtype (parameters stay float32).
    backend: how convolutions and the stem's max pool are computed on the platform
      (`dett_jax.models.backend.Backend`; parameters and function do not depend on it).
  """

  head_name: ClassVar[str] = "head"

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int | None
  width: float = 1.0
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  backend: Backend = Backend()

  def setup_check(self) -> None:
    if self.stem not in ("imagenet", "small"):
      raise ValueError(f"model.stem must be 'imagenet' or 'small', got {self.stem!r}")

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
    """Maps images `[batch, h, w, 3]` to feature map, pooled features and logits."""
    self.setup_check()
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype,
        conv_general_dilated=self.backend.conv_fn())
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype)
    base = max(1, int(round(64 * self.width)))
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(base, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = self.backend.max_pool(x, (3, 3), (2, 2), PAD3)
    else:
      x = conv(base, (3, 3), padding=PAD3, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    for i, block_count in enumerate(self.stage_sizes):
      for j in range(block_count):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(base * 2**i, conv=conv, norm=norm, strides=strides)(x)
    feature_map = x.astype(jnp.float32)
    features = self.pool(feature_map)
    out = {"feature_map": feature_map, "features": features}
    if self.num_classes:
      out["logits"] = nn.Dense(self.num_classes, name=self.head_name)(features)
    return out

  def pool(self, feature_map: jnp.ndarray) -> jnp.ndarray:
    """Pooled features `[b, c]` of a feature map `[b, h, w, c]`: the spatial mean."""
    return jnp.mean(feature_map, axis=(1, 2))


STAGES: dict[int, tuple[tuple[int, ...], ModuleDef]] = {
    10: ((1, 1, 1, 1), BasicBlock),
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
}


def create_resnet(depth: int, num_classes: int | None, width: float = 1.0, stem: str = "imagenet",
                  dtype: Any = jnp.float32, backend: Backend = Backend()) -> ResNet:
  """Builds ResNet-`depth` (10, 18, 34 or 50), a Linen module.

  `model.apply(variables, images [b, h, w, 3], train=...)` returns `feature_map`
  `[b, h', w', c]` (the last stage, before pooling), `features` `[b, c]` (pooled) and,
  with `num_classes`, `logits` `[b, num_classes]` from the Dense submodule `head`.
  Stage widths are `round(64 * width) * 2**i`; `stem="small"` keeps full resolution for
  32-pixel images (the last map is then 1/8 of the input). See `ResNet` in
  `dett_jax.models.resnet` for `dtype` and `backend` (`Backend.from_settings(...)`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dett_jax import create_resnet
    >>> model = create_resnet(18, num_classes=2, width=0.125, stem="small")
    >>> images = jnp.zeros((1, 32, 32, 3))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
    >>> out = jax.eval_shape(model.apply, variables, images)
    >>> out["feature_map"].shape, out["logits"].shape, variables["params"]["head"]["kernel"].shape
    ((1, 4, 4, 64), (1, 2), (64, 2))
  """
  if depth not in STAGES:
    raise ValueError(f"model depth must be one of 10, 18, 34, 50; got {depth}")
  if stem not in ("imagenet", "small"):
    raise ValueError(f"model stem must be 'imagenet' or 'small'; got {stem!r}")
  if width <= 0:
    raise ValueError(f"model width must be > 0; got {width}")
  stage_sizes, block_cls = STAGES[depth]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                width=width, stem=stem, dtype=dtype, backend=backend)


def feature_channels(depth: int, width: float) -> int:
  """Channels of the last-stage feature map of ResNet-`depth` at `width`."""
  base = max(1, int(round(64 * width)))
  expansion = 4 if STAGES[depth][1] is BottleneckBlock else 1
  return base * 8 * expansion
