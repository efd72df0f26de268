"""Max pooling over windows that tile the map: elementwise maxima of
strided slices with the gradient written out (`tiled_max_pool`), on every
backend. On the CPU, JAX's derivative of a reshape-and-max is a strided
reduction YNNPACK runs on one thread, and XLA's select-and-scatter (the
derivative of `nn.max_pool`) was about 8x slower still; other windows keep
`nn.max_pool`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _tiled_max(x: Array, k: int) -> Array:
  """Max over the non-overlapping k x k windows that tile x (NHWC) as
  elementwise maxima of strided slices: XLA fuses them into one loop."""
  n, h, w, c = x.shape
  rows = x.reshape(n, h // k, k, w // k, k * c)
  m = functools.reduce(jnp.maximum, [rows[:, :, i] for i in range(k)])
  return functools.reduce(jnp.maximum,
                          [m[..., j * c:(j + 1) * c] for j in range(k)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x: Array, k: int) -> Array:
  """Max pooling over non-overlapping k x k windows that tile x exactly.
  The gradient is JAX's for a max reduction: dy split equally among the
  cells of a window that equal its maximum (a window of ReLU zeros gives
  each a quarter; a window holding a NaN passes NaN to all its cells),
  computed by one compare and product over x. JAX's own derivative of the
  reshape-and-max (a strided reduction YNNPACK runs on one thread) took
  28-64 ms at 128x32x32x64 inside and outside a step, this 4-11 ms (the
  forward pass and tanh included; 31.6 against 10.6 ms alternating in one
  process)."""
  return _tiled_max(x, k)


def _tiled_max_pool_fwd(x, k):
  y = _tiled_max(x, k)
  return y, (x, y)


def _tiled_max_pool_bwd(k, residuals, dy):
  x, y = residuals
  n, h, w, c = x.shape
  hit = x.reshape(n, h // k, k, w // k, k, c) == y[:, :, None, :, None, :]
  # The count as a sum of slices: a reduction here is the slow op again.
  count = sum(hit[:, :, i, :, j].astype(dy.dtype)
              for i in range(k) for j in range(k))
  share = (dy / count)[:, :, None, :, None, :]
  # A product, not a select: a window holding a NaN has no cell equal to
  # its maximum (NaN), count 0 and share inf or NaN, and 0 * that passes
  # NaN to all its cells, as JAX's derivative does.
  return ((hit.astype(dy.dtype) * share).reshape(x.shape),)


tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


def max_pool(x: Array, window: int, stride: int, padding) -> Array:
  """Max pooling (NHWC) with `padding` 'VALID', 'SAME' or explicit (low,
  high) pairs per axis. Non-overlapping windows that tile the map exactly
  take `tiled_max_pool`: the same values and gradients as `nn.max_pool`."""
  _, h, w, _ = x.shape
  if stride == window and padding == 'VALID' and h % window == 0 and (
      w % window == 0):
    return tiled_max_pool(x, window)
  return nn.max_pool(x, (window, window), (stride, stride), padding)
