"""Convolution as image patches x matrix for maps smaller than the kernel.

XLA:CPU's algebraic simplifier swaps the operands of a convolution whose kernel is
larger than its input or output map (a 3x3 convolution on a 2x2 map, or a strided one
onto it: ResNet's last stage at 64 pixels, SimKD's 3x3 projector there). The swapped
convolution, and the input gradient of the strided one, run at about 1 GFLOP/s on a
CPU core, 10x slower than the rest of the step (`benchmarks/throughput.py
--small_map_conv`). `conv_general_dilated` below computes exactly those convolutions as
`patches @ kernel.reshape(-1, out)` (a dot, fast forward and backward) and hands every
other one to `lax.conv_general_dilated`. Parameters keep Flax's `nn.Conv` names and
shapes, so checkpoints do not change.

`conv_fn(small_map, pointwise)` also offers 1x1 convolutions as plain dots: XLA's SPMD
partitioner computes a `jax.vmap`-ed 1x1 convolution (kernel and input both carrying the
vmapped axis, as in a stacked sweep) wrongly when that axis is sharded over a mesh axis
(tested in tests/test_models.py), and the dot form avoids it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

SETTINGS = ("auto", "patches", "xla")


def use_patches(setting: str, platform: str | None = None) -> bool:
  """Whether a `small_map_conv` setting ("auto", "patches", "xla") means patches.

  "auto" means patches on CPU (where XLA's slow path is) and XLA elsewhere.
  """
  if setting not in SETTINGS:
    raise ValueError(f"small_map_conv must be one of {SETTINGS}, got {setting!r}")
  if setting == "auto":
    return (platform or jax.default_backend()) == "cpu"
  return setting == "patches"


def _all_ones(values: Sequence[int] | None) -> bool:
  return values is None or all(v == 1 for v in values)


@functools.lru_cache(maxsize=None)
def conv_fn(small_map: bool, pointwise: bool = False, everywhere: bool = False
            ) -> Callable | None:
  """The `conv_general_dilated` for `flax.linen.Conv`: maps smaller than the kernel
  (`small_map`), 1x1 convolutions (`pointwise`) or every convolution (`everywhere`) as
  image patches times the kernel matrix; None: XLA's own convolution.

  `everywhere` is for stacked sweep variants on CPU: `jax.vmap` turns a convolution whose
  kernel and input both carry the variant axis into a grouped convolution, which XLA:CPU
  runs ~2x slower per variant than separate ones, while the patches form becomes one
  batched matrix product (`benchmarks/sweep_speed.py`)."""
  if not (small_map or pointwise or everywhere):
    return None
  return functools.partial(_conv, small_map=small_map or everywhere, pointwise=pointwise,
                           everywhere=everywhere)


def output_size(spatial: Sequence[int], window: Sequence[int], strides: Sequence[int],
                pads: Sequence[Sequence[int]]) -> tuple[int, ...]:
  """Output height and width of a window sliding over `spatial` with explicit `pads`."""
  return tuple((s + lo + hi - k) // st + 1
               for s, k, st, (lo, hi) in zip(spatial, window, strides, pads))


def window_slices(padded: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
                  out: Sequence[int]) -> list[jnp.ndarray]:
  """What each window position (row-major over `window`) sees of the padded NHWC map:
  `[b, oh, ow, c]` strided views, the image patches of a convolution or pool."""
  (sh, sw), (oh, ow) = strides, out
  b, c = padded.shape[0], padded.shape[3]
  return [lax.slice(padded, (0, i, j, 0), (b, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(window[0]) for j in range(window[1])]


def conv_general_dilated(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Sequence[int],
                         padding: Any, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jnp.ndarray:
  """`lax.conv_general_dilated` with NHWC/HWIO maps smaller than the kernel as a dot.

  Same signature and result as `lax.conv_general_dilated`; pass it to
  `flax.linen.Conv(conv_general_dilated=...)`.
  """
  return _conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count, batch_group_count, precision,
               preferred_element_type, small_map=True, pointwise=False)


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
          dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
          preferred_element_type=None, *, small_map: bool, pointwise: bool,
          everywhere: bool = False) -> jnp.ndarray:
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (lhs.ndim == 4 and tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
      and tuple(dn.out_spec) == (0, 3, 1, 2) and _all_ones(lhs_dilation)
      and _all_ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1):
    kernel, spatial = rhs.shape[:2], lhs.shape[1:3]
    pads = (lax.padtype_to_pads(spatial, kernel, window_strides, padding)
            if isinstance(padding, str) else tuple(tuple(p) for p in padding))
    out = output_size(spatial, kernel, window_strides, pads)
    if (pointwise or everywhere) and tuple(kernel) == (1, 1) and all(p == (0, 0) for p in pads):
      (sh, sw), (oh, ow) = window_strides, out
      strided = lax.slice(lhs, (0, 0, 0, 0), (lhs.shape[0], sh * (oh - 1) + 1,
                                              sw * (ow - 1) + 1, lhs.shape[3]), (1, sh, sw, 1))
      return jnp.dot(strided, rhs.reshape(rhs.shape[-2], rhs.shape[-1]), precision=precision,
                     preferred_element_type=preferred_element_type)
    if everywhere or (small_map and any(k > min(s, o) for k, s, o in zip(kernel, spatial, out))):
      padded = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
      patches = jnp.concatenate(  # [b, oh, ow, kh * kw * c], (kh, kw, c)-major like HWIO
          window_slices(padded, kernel, window_strides, out), axis=-1)
      return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision,
                     preferred_element_type=preferred_element_type)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)
