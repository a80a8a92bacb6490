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
import jax
import jax.numpy as jnp
from jax import lax

from dett_jax.models import conv as conv_lib


def _padded(x, window, strides, padding):
  """(pads, output size, `x` padded with -inf)."""
  pads = tuple(tuple(p) for p in padding)
  low = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  xp = lax.pad(x, jnp.asarray(low, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
  return pads, conv_lib.output_size(x.shape[1:3], window, strides, pads), xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
  """Max pool of NHWC `x` over `window` with `strides` and explicit `padding` ((lo, hi)
  per spatial axis, padded with -inf); equals `flax.linen.max_pool(x, window, strides,
  padding)` forward and backward (the gradient goes to each window's first maximum)."""
  _, out, xp = _padded(x, window, strides, padding)
  return functools.reduce(jnp.maximum, conv_lib.window_slices(xp, window, strides, out))


def _fwd(x, window, strides, padding):
  y = max_pool(x, window, strides, padding)
  return y, (x, y)


def _bwd(window, strides, padding, residuals, g):
  x, y = residuals
  pads, out, xp = _padded(x, window, strides, padding)
  taken = jnp.zeros(y.shape, bool)
  grad = jnp.zeros(xp.shape, g.dtype)
  (sh, sw), (oh, ow) = strides, out
  for t, piece in enumerate(conv_lib.window_slices(xp, window, strides, out)):
    i, j = divmod(t, window[1])
    hit = (piece == y) & ~taken
    taken = taken | hit
    grad = grad + lax.pad(jnp.where(hit, g, jnp.zeros_like(g)), jnp.zeros((), g.dtype),
                          ((0, 0, 0), (i, xp.shape[1] - i - sh * (oh - 1) - 1, sh - 1),
                           (j, xp.shape[2] - j - sw * (ow - 1) - 1, sw - 1), (0, 0, 0)))
  (lo_h, _), (lo_w, _) = pads
  return (lax.slice(grad, (0, lo_h, lo_w, 0), (x.shape[0], lo_h + x.shape[1], lo_w + x.shape[2],
                                               x.shape[3])),)


max_pool.defvjp(_fwd, _bwd)
