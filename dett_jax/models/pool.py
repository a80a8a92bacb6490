"""Max pooling with a cheap gradient on CPU.

`flax.linen.max_pool` lowers to `reduce_window`, whose gradient on XLA:CPU is a
`select_and_scatter` preceded by index (iota) arrays the size of the padded input:
ResNet's stem pool at 64 pixels, batch 64, spent ~95 ms per training step there, ~10% of
the ResNet-18 step (`benchmarks/throughput.py --profile`). `max_pool` below computes the
same pool as the maximum of the window's strided slices and its gradient by routing each
output's gradient to the first maximum of its window (row-major order, as
`select_and_scatter` picks it), all elementwise work that XLA fuses.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _slices(xp: jnp.ndarray, window: Sequence[int], strides: Sequence[int],
            out: Sequence[int]) -> list[tuple[tuple[int, int], jnp.ndarray]]:
  (kh, kw), (sh, sw), (oh, ow) = window, strides, out
  b, c = xp.shape[0], xp.shape[3]
  return [((i, j), lax.slice(xp, (0, i, j, 0), (b, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                             (1, sh, sw, 1)))
          for i in range(kh) for j in range(kw)]


def _geometry(x, window, strides, padding):
  pads = tuple(tuple(p) for p in padding)
  out = tuple((s + lo + hi - k) // st + 1
              for s, k, st, (lo, hi) in zip(x.shape[1:3], window, strides, pads))
  low = jnp.array(-jnp.inf, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  xp = lax.pad(x, jnp.asarray(low, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
  return pads, out, xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
  """Max pool of NHWC `x` over `window` with `strides` and explicit `padding` ((lo, hi)
  per spatial axis, padded with -inf); equals `flax.linen.max_pool(x, window, strides,
  padding)` forward and backward (the gradient goes to each window's first maximum)."""
  _, out, xp = _geometry(x, window, strides, padding)
  return functools.reduce(jnp.maximum, [s for _, s in _slices(xp, window, strides, out)])


def _fwd(x, window, strides, padding):
  y = max_pool(x, window, strides, padding)
  return y, (x, y)


def _bwd(window, strides, padding, residuals, g):
  x, y = residuals
  pads, out, xp = _geometry(x, window, strides, padding)
  taken = jnp.zeros(y.shape, bool)
  grad = jnp.zeros(xp.shape, g.dtype)
  (sh, sw), (oh, ow) = strides, out
  for (i, j), piece in _slices(xp, window, strides, out):
    hit = (piece == y) & ~taken
    taken = taken | hit
    grad = grad + lax.pad(jnp.where(hit, g, jnp.zeros_like(g)), jnp.zeros((), g.dtype),
                          ((0, 0, 0), (i, xp.shape[1] - i - sh * (oh - 1) - 1, sh - 1),
                           (j, xp.shape[2] - j - sw * (ow - 1) - 1, sw - 1), (0, 0, 0)))
  (lo_h, _), (lo_w, _) = pads
  return (lax.slice(grad, (0, lo_h, lo_w, 0), (x.shape[0], lo_h + x.shape[1], lo_w + x.shape[2],
                                               x.shape[3])),)


max_pool.defvjp(_fwd, _bwd)
