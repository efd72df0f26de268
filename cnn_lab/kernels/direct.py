"""Direct paths: a convolution as matmuls over shifted views of its input.

- 'shifted': one matmul per kernel tap (i, j), window_ij @ kernel_ij, summed
  (`conv_shifted`); its kernel gradient window_ij^T @ dy per tap
  (`kernel_grad_shifted`).
- 'im2col': the kh*kw windows stacked into patches (N*Ho*Wo, kh*kw*ci), one
  matmul with the kernel made 2-D (`conv_im2col`); its kernel gradient
  patches^T @ dy ('matmul', `kernel_grad_matmul`).
- 'chunked': the shifted paths in a loop over chunks of the batch of at
  most CHUNK_BYTES, so that each chunk's windows are used while they are
  in cache (`conv_chunked`, `kernel_grad_chunked`).

Where each one runs, and the measurements behind it: `select`.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab.kernels.geometry import conv_geometry, explicit_padding

Array = jax.Array

# The chunked paths loop over chunks of the batch whose input (kernel
# gradient) or output (forward pass) takes at most CHUNK_BYTES; 1 MiB did
# as well as or better than 256 KiB to 4 MiB (`select`).
CHUNK_BYTES = 1024 * 1024


def _matmul(a: Array, b: Array, contracting, accumulate_f32: bool = False
            ) -> Array:
  """dot_general without batch dimensions, returning the operands' dtype.
  With `accumulate_f32` the sum is carried in float32 (for the kernel
  gradient, a sum over N*Ho*Wo terms); the forward paths do without it,
  as JAX would differentiate the float32 result into mixed-dtype products."""
  out = lax.dot_general(
      a, b, (contracting, ((), ())),
      preferred_element_type=jnp.float32 if accumulate_f32 else None)
  return out.astype(a.dtype)


def _windows(x: Array, kernel_hw, strides, padding):
  """The kh*kw shifted (and strided) views of padded `x`, each the shape of
  the output map: window (i, j) holds x[n, sh*y + i, sw*x + j, c]."""
  kh, kw = kernel_hw
  sh, sw = strides
  pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  return [
      lax.slice(x, (0, i, j, 0),
                (x.shape[0], i + sh * (out_h - 1) + 1,
                 j + sw * (out_w - 1) + 1, x.shape[3]), (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)]


def _patches(x: Array, kernel_hw, strides, padding) -> Array:
  """im2col, (N*Ho*Wo, kh*kw*ci): column (i*kw + j)*ci + c holds input
  channel c under tap (i, j), the order of an HWIO kernel made 2-D."""
  windows = _windows(x, kernel_hw, strides, padding)
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, -1)
  return patches.reshape(-1, patches.shape[-1])


def conv_shifted(x: Array, kernel: Array, strides: Sequence[int],
                 padding) -> Array:
  """2-D convolution (NHWC, HWIO) as a sum of kh*kw shifted matmuls."""
  kh, kw, ci, co = kernel.shape
  out = None
  for window, k in zip(_windows(x, (kh, kw), strides, padding),
                       kernel.reshape(kh * kw, ci, co)):
    term = _matmul(window, k, ((3,), (0,)))
    out = term if out is None else out + term
  return out


def conv_im2col(x: Array, kernel: Array, strides: Sequence[int],
                padding) -> Array:
  """2-D convolution as one matmul over the stacked windows (im2col).

  With few input channels the shifted matmuls are too thin to run at matmul
  speed; stacking the kh*kw windows gives one product with kh*kw*ci terms.
  """
  kh, kw, ci, co = kernel.shape
  _, (out_h, out_w) = conv_geometry(x.shape[1:3], (kh, kw), strides, padding)
  patches = _patches(x, (kh, kw), strides, padding)
  out = _matmul(patches, kernel.reshape(kh * kw * ci, co), ((1,), (0,)))
  return out.reshape(x.shape[0], out_h, out_w, co)


def batch_chunk(batch: int, image_bytes: int, target_bytes: int) -> int:
  """Images per chunk of the chunked paths: the largest divisor of
  `batch` whose chunk, at `image_bytes` per image, takes at most
  `target_bytes` (at least 1)."""
  most = max(1, target_bytes // max(1, image_bytes))
  return max(d for d in range(1, min(batch, most) + 1) if batch % d == 0)


def _split_batch(a: Array, chunk: int) -> Array:
  """(N, ...) as (N // chunk, chunk, ...), for a loop over the chunks."""
  return a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


def conv_chunked(x: Array, kernel: Array, strides: Sequence[int],
                 padding) -> Array:
  """`conv_shifted` over chunks of the batch, in a loop (`lax.map`).

  With one input channel the shifted products are elementwise multiply-adds
  that XLA fuses into every consumer of the output, the pooling after it
  and that pooling's derivative, recomputing all kh*kw taps there. Fusion
  does not cross a loop's boundary, so the output is computed once. (XLA
  removes a loop of one iteration: a batch of two or more images takes at
  least two chunks.)
  """
  n = x.shape[0]
  _, (out_h, out_w) = conv_geometry(x.shape[1:3], kernel.shape[:2], strides,
                                    padding)
  image_bytes = out_h * out_w * kernel.shape[3] * x.dtype.itemsize
  chunk = batch_chunk(n, image_bytes,
                      min(CHUNK_BYTES, max(1, n // 2) * image_bytes))
  y = lax.map(lambda part: conv_shifted(part, kernel, strides, padding),
              _split_batch(x, chunk))
  return y.reshape(n, *y.shape[2:])



def kernel_grad_matmul(x, dy, kernel_shape, strides, pads):
  """The kernel gradient as one matmul, patches^T @ dy."""
  patches = _patches(x, kernel_shape[:2], strides, pads)
  dw = _matmul(patches, dy.reshape(-1, dy.shape[-1]), ((0,), (0,)), True)
  return dw.reshape(kernel_shape)


def kernel_grad_shifted(x, dy, kernel_shape, strides, pads):
  """One matmul per tap (i, j): window^T @ dy, (ci, co)."""
  kh, kw, ci, co = kernel_shape
  dy = dy.reshape(-1, co)
  return jnp.stack([
      _matmul(w.reshape(-1, ci), dy, ((0,), (0,)), True)
      for w in _windows(x, (kh, kw), strides, pads)]).reshape(kernel_shape)


def kernel_grad_chunked(x, dy, kernel_shape, strides, pads):
  """`kernel_grad_shifted` over chunks of the batch, summed in a scan: the
  windows of a chunk are built and used while they are still in cache."""
  n = x.shape[0]
  chunk = batch_chunk(n, math.prod(x.shape[1:]) * x.dtype.itemsize,
                      CHUNK_BYTES)
  if chunk == n:
    return kernel_grad_shifted(x, dy, kernel_shape, strides, pads)

  def body(total, chunk_xy):
    part = kernel_grad_shifted(*chunk_xy, kernel_shape, strides, pads)
    return total + part.astype(jnp.float32), None

  total, _ = lax.scan(body, jnp.zeros(kernel_shape, jnp.float32),
                      (_split_batch(x, chunk), _split_batch(dy, chunk)))
  return total

