"""Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", 2016) for 3x3 convolutions at
stride 1 with one pixel of padding: per 4x4 output block, 36 products per
pair of channels instead of 144, as one batched matmul between linear
transforms of the input tiles, the kernel and the products
(`conv_winograd`); its kernel gradient is the same products transposed
(`kernel_grad_winograd`). Where it runs and why: `select`.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.kernels.geometry import explicit_padding

Array = jax.Array

# The matrices for interpolation points 0, 1, -1, 2, -2 and infinity: a 4x4
# block of a 3x3 convolution's output is A^T [(G g G^T) * (B^T d B)] A for
# the 6x6 input tile d under it and the kernel g. The three linear maps are
# adds and scalings, cheap next to the products when both channel counts
# are large.
WINOGRAD_TILE = 4
WINOGRAD_BT = np.array([[4, 0, -5, 0, 1, 0],
                        [0, -4, -4, 1, 1, 0],
                        [0, 4, -4, -1, 1, 0],
                        [0, -2, -1, 2, 1, 0],
                        [0, 2, -1, -2, 1, 0],
                        [0, 4, 0, -5, 0, 1]], np.float64)
WINOGRAD_G = np.array([[1 / 4, 0, 0],
                       [-1 / 6, -1 / 6, -1 / 6],
                       [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6],
                       [1 / 24, -1 / 12, 1 / 6],
                       [0, 0, 1]], np.float64)
WINOGRAD_AT = np.array([[1, 1, 1, 1, 1, 0],
                        [0, 1, -1, 2, -2, 0],
                        [0, 1, 1, 4, 4, 0],
                        [0, 1, -1, 8, -8, 1]], np.float64)
# G g G^T for a 3x3 kernel g flattened row-major: kron(G, G) @ vec(g).
WINOGRAD_GG = np.kron(WINOGRAD_G, WINOGRAD_G)


def winograd_applies(kernel_hw, strides, pads) -> bool:
  """Whether `conv_winograd` computes this convolution: a 3x3 kernel at
  stride 1 with one pixel of padding on every side ('SAME')."""
  return (tuple(kernel_hw) == (3, 3) and tuple(strides) == (1, 1) and
          tuple(map(tuple, pads)) == ((1, 1), (1, 1)))


def _combine(coefficients, terms):
  """sum(c * t), skipping zeros and multiplying by +-1 for free."""
  out = None
  for c, t in zip(coefficients, terms):
    if c == 0:
      continue
    t = t if c == 1 else -t if c == -1 else t * float(c)
    out = t if out is None else out + t
  return out


def _winograd_tiles(x: Array) -> tuple[Array, tuple[int, int]]:
  """B^T d B for every 6x6 tile d of x padded by one pixel (tiles 4 apart),
  as (36, N*tiles_h*tiles_w, C), and (tiles_h, tiles_w). Maps that are not
  multiples of 4 are padded with zeros at the bottom and right."""
  m, a = WINOGRAD_TILE, WINOGRAD_TILE + 2
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  x = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
  rows = [lax.slice_in_dim(x, k, k + m * (th - 1) + 1, m, axis=1)
          for k in range(a)]
  tiles = []
  for row in (_combine(b, rows) for b in WINOGRAD_BT):
    cols = [lax.slice_in_dim(row, k, k + m * (tw - 1) + 1, m, axis=2)
            for k in range(a)]
    tiles += [_combine(b, cols) for b in WINOGRAD_BT]
  return jnp.stack(tiles).reshape(a * a, n * th * tw, c), (th, tw)


def _winograd_kernel(kernel: Array) -> Array:
  """G g G^T for every pair of channels, (36, ci, co)."""
  kh, kw, ci, co = kernel.shape
  gg = jnp.asarray(WINOGRAD_GG, kernel.dtype)
  return (gg @ kernel.reshape(kh * kw, ci * co)).reshape(-1, ci, co)


def conv_winograd(x: Array, kernel: Array, strides: Sequence[int],
                  padding) -> Array:
  """3x3 convolution at stride 1 with 'SAME' padding by Winograd's F(4x4,
  3x3): per tile position one batched matmul over all tiles."""
  pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  if not winograd_applies(kernel.shape[:2], strides, pads):
    raise ValueError('conv_winograd takes 3x3 kernels at stride 1 with '
                     f'padding 1, not {kernel.shape[:2]}, {strides}, {pads}')
  m, a = WINOGRAD_TILE, WINOGRAD_TILE + 2
  n, h, w, _ = x.shape
  co = kernel.shape[-1]
  tiles, (th, tw) = _winograd_tiles(x)
  prods = lax.dot_general(tiles, _winograd_kernel(kernel),
                          (((2,), (1,)), ((0,), (0,))))
  prods = prods.reshape(a, a, n, th, tw, co)
  rows = [_combine(r, list(prods)) for r in WINOGRAD_AT]
  out = jnp.stack([
      jnp.stack([_combine(r, list(row)) for r in WINOGRAD_AT], 3)
      for row in rows], 2)        # (n, th, 4 rows, tw, 4 columns, co)
  return out.reshape(n, th * m, tw * m, co)[:, :h, :w]


def kernel_grad_winograd(x, dy, kernel_shape, strides, pads):
  """The kernel gradient of `conv_winograd`: its products transposed,
  sum over tiles of (B^T d B)^T (A dy A^T), one matmul per tile position,
  then G^T (.) G back to 3x3."""
  del strides, pads  # Those of conv_winograd (winograd_applies).
  m, a = WINOGRAD_TILE, WINOGRAD_TILE + 2
  n, h, w, co = dy.shape
  tiles, (th, tw) = _winograd_tiles(x)
  dy = jnp.pad(dy, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0)))
  dy = dy.reshape(n, th, m, tw, m, co)
  rows = [_combine(col, [dy[:, :, i] for i in range(m)])
          for col in WINOGRAD_AT.T]          # (n, th, tw, 4 columns, co)
  dprods = jnp.stack([_combine(col, [row[:, :, :, j] for j in range(m)])
                      for row in rows for col in WINOGRAD_AT.T])
  dprods = dprods.reshape(a * a, n * th * tw, co)
  dkernel = lax.dot_general(tiles, dprods, (((1,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)
  gg = jnp.asarray(WINOGRAD_GG, jnp.float32)
  return (gg.T @ dkernel.reshape(a * a, -1)).reshape(kernel_shape)

