"""One policy for how the models compute their convolutions and pools on a platform.

The models (`ResNet`, `Projector`) take a `Backend` instead of per-operation flags; the
experiment builds it once from its settings (`Backend.from_settings`) and the sweep
derives the policy of a stacked group from it (`Backend.stacked`). The choices change
how XLA computes, never the parameters (names, shapes) or the function computed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dett_jax.models import conv as conv_lib
from dett_jax.models import pool as pool_lib

CONV_SETTINGS = ("auto", "patches", "xla")


@dataclasses.dataclass(frozen=True)
class Backend:
  """How the models compute on the platform (hashable: a Flax module field).

  Attributes:
    small_map_conv: convolutions on maps smaller than their kernel as patches x matrix
      (XLA:CPU's own path for them is ~10x slower; `dett_jax.models.conv`).
    pointwise_dot: 1x1 convolutions as dots (needed when stacked variants are vmapped
      with their axis sharded over a mesh axis, where XLA's SPMD conv is wrong).
    patches_everywhere: every convolution as patches x matrix (vmapped stacked variants
      on CPU, where the grouped convolution vmap makes is ~2x slower per variant).
    fast_max_pool_grad: max pools as strided-slice maxima with an elementwise gradient
      (`dett_jax.models.pool.max_pool`, equal to `nn.max_pool` forward and backward);
      False: `flax.linen.max_pool` (`reduce_window`, `select_and_scatter` gradient).

  `Backend()` is XLA's own convolutions (and the fast max-pool gradient, which computes
  the same as `nn.max_pool`).

  Examples:
    >>> from dett_jax.models.backend import Backend
    >>> Backend().conv_fn() is None                 # XLA's own convolutions
    True
    >>> Backend.from_settings("patches").small_map_conv
    True
    >>> group = Backend.from_settings("auto", platform="cpu").stacked(
    ...     sharded=True, vmapped=True, platform="cpu")
    >>> group.small_map_conv, group.pointwise_dot, group.patches_everywhere
    (True, True, True)
  """

  small_map_conv: bool = False
  pointwise_dot: bool = False
  patches_everywhere: bool = False
  fast_max_pool_grad: bool = True

  @classmethod
  def from_settings(cls, small_map_conv: str = "auto", platform: str | None = None
                    ) -> "Backend":
    """The policy of `config.small_map_conv` ("auto": patches on CPU, "patches", "xla")
    on `platform` (default: JAX's default backend); ValueError for another setting."""
    return cls(small_map_conv=conv_lib.use_patches(small_map_conv, platform))

  def stacked(self, *, sharded: bool, vmapped: bool, conv: str = "auto",
              platform: str | None = None) -> "Backend":
    """The policy for a sweep group of stacked variants.

    sharded: the variant axis may be sharded over a mesh axis (1x1 convolutions as dots).
    vmapped: the variants run `jax.vmap`-ed (several of them, not looped).
    conv: `sweep.conv`: "auto" (every convolution as patches when vmapped on CPU),
      "patches" or "xla"; ValueError otherwise.
    """
    if conv not in CONV_SETTINGS:
      raise ValueError(f"sweep.conv must be one of {CONV_SETTINGS}, got {conv!r}")
    if conv == "auto":
      everywhere = vmapped and (platform or jax.default_backend()) == "cpu"
    else:
      everywhere = conv == "patches"
    return dataclasses.replace(self, pointwise_dot=self.pointwise_dot or sharded,
                               patches_everywhere=everywhere)

  def conv_fn(self) -> Callable | None:
    """The `conv_general_dilated` to hand to `flax.linen.Conv` (None: XLA's own)."""
    return conv_lib.conv_fn(self.small_map_conv, self.pointwise_dot, self.patches_everywhere)

  def max_pool(self, x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
               padding: Sequence[tuple[int, int]]) -> jnp.ndarray:
    """Max pool of NHWC `x` with explicit `padding` ((lo, hi) per spatial axis)."""
    padding = tuple(tuple(p) for p in padding)
    if self.fast_max_pool_grad:
      return pool_lib.max_pool(x, tuple(window), tuple(strides), padding)
    return nn.max_pool(x, tuple(window), tuple(strides), padding)
