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
from jax import lax

Array = jax.Array


def _tiled_max(x: Array, k: int) -> Array:
  """Max over the non-overlapping k x k windows that tile x (NHWC) as
  elementwise maxima of strided slices: XLA fuses them into one loop."""
  n, h, w, c = x.shape
  rows = x.reshape(n, h // k, k, w // k, k * c)
  m = functools.reduce(jnp.maximum, [rows[:, :, i] for i in range(k)])
  return functools.reduce(jnp.maximum,
                          [m[..., j * c:(j + 1) * c] for j in range(k)])


# Windows of up to 25 cells: which cells of a window are its maxima is kept
# as an int32 bit mask.
MAX_TILED_WINDOW = 5


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x: Array, k: int) -> Array:
  """Max pooling over non-overlapping k x k windows (k <= 5) that tile x
  exactly. The gradient is JAX's for a max reduction: dy split equally
  among the cells of a window that equal its maximum (a window of ReLU
  zeros gives each a quarter; a window holding a NaN passes NaN to all its
  cells), from a bit mask of those cells computed once per window
  (`_tiled_max_pool_bwd`). JAX's own derivative of the reshape-and-max (a
  strided reduction YNNPACK runs on one thread) took 28-64 ms at
  128x32x32x64 inside and outside a step, this 4-11 ms (the forward pass
  and tanh included; 31.6 against 10.6 ms alternating in one process).
  The mask takes the time of the compare with y it replaced (alternating
  on a loaded 2-core machine, fastest of 60: 41.2 against 43.4 ms there,
  60.4 against 64.4 after batch norm and ReLU; LeNet-5's gradient at
  batch 128, fastest of 100, 6.02 against 6.00 ms, with batch norm 8.07
  against 7.79)."""
  return _tiled_max(x, k)


def _tiled_max_pool_fwd(x, k):
  return _tiled_max(x, k), x


def _window_maxima(x: Array, k: int) -> Array:
  """Per window, an int32 whose bit i * k + j is set where cell (i, j) is
  >= every other cell of the window: its maxima, none where it holds a
  NaN."""
  n, h, w, c = x.shape
  windows = x.reshape(n, h // k, k, w // k, k, c)
  cells = [windows[:, :, i, :, j] for i in range(k) for j in range(k)]
  mask = sum(functools.reduce(jnp.logical_and, [
      cell >= other for q, other in enumerate(cells) if q != p
  ], cell == cell).astype(jnp.int32) << p for p, cell in enumerate(cells))
  # The identity (mask < 2^(k*k)), for speed: XLA's CPU fusion does not
  # copy an integer remainder into a consumer that reads each element k*k
  # times, so the mask is computed once per window and stored, rather than
  # again for every cell of the gradient.
  return mask % (2**(k * k) + 1)


def _tiled_max_pool_bwd(k, x, dy):
  # Everything from one mask, made of comparisons of x with x only (never
  # with y): under jit XLA may recompute x (a batch norm and ReLU, say) in
  # each fusion that reads it, and its CPU code rounds one expression
  # differently in different fusions (a fused multiply-add in one, a
  # multiply and a subtract in another). Comparing x from one fusion with
  # y from another left windows with no cell equal to their maximum,
  # count 0 and NaN gradients (LeNet-5 with batch norm); an
  # optimization_barrier does not help, as XLA's CPU pipeline removes
  # barriers before fusing. A mask computed in one expression has a set
  # bit in every window without a NaN, and the share and the cells it
  # goes to read the same mask.
  mask = _window_maxima(x, k)
  nan = mask == 0
  count = lax.population_count(mask).astype(dy.dtype)
  # NaN for a window holding a NaN, to all its cells, as JAX's derivative
  # passes it. Selects: XLA turns a product by a 0/1 mask into a select,
  # which would drop the NaN.
  share = jnp.where(nan, jnp.nan, dy / jnp.maximum(count, 1))
  bit = (k * jnp.arange(k)[:, None] + jnp.arange(k)).astype(jnp.int32)
  hit = (mask[:, :, None, :, None, :] >> bit[:, None, :, None]) & 1
  hit = (hit == 1) | nan[:, :, None, :, None, :]
  return (jnp.where(hit, share[:, :, None, :, None, :], 0)
          .reshape(x.shape),)


tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


def max_pool(x: Array, window: int, stride: int, padding) -> Array:
  """Max pooling (NHWC) with `padding` 'VALID', 'SAME' or explicit (low,
  high) pairs per axis. Non-overlapping windows that tile the map exactly
  of at most `MAX_TILED_WINDOW` cells a side take `tiled_max_pool`: the
  same values as `nn.max_pool` and the same gradients but where a window's
  maximum is tied (split equally there, as JAX's max reduction does;
  `nn.max_pool` gives all of it to the first)."""
  _, h, w, _ = x.shape
  if (stride == window <= MAX_TILED_WINDOW and padding == 'VALID'
      and h % window == 0 and w % window == 0):
    return tiled_max_pool(x, window)
  return nn.max_pool(x, (window, window), (stride, stride), padding)
