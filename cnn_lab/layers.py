"""Building blocks shared by every architecture: convolution, activations,
initialisers, normalisation.

`Conv` is the one convolution layer of cnn_lab. It holds the same variables
as `flax.linen.Conv` (`kernel` HWIO, `bias`) and picks, by backend and
shape, how its forward pass, its input gradient (dx) and its kernel
gradient (dw) are computed (`select_conv_paths`; `conv_paths` joins the
three with a custom VJP). On GPU/TPU all three are XLA's convolution. On
CPU, measured in whole training steps (batch 128, float32) on a 2-core AMD
EPYC (AVX-512) with jax 0.10.2, whose XLA runs matmuls with YNNPACK and,
once cnn_lab is imported, convolutions with Eigen (cnn_lab/xla_flags.py;
the figures below from before that change were measured with YNNPACK's
convolutions, and say so):

- XLA's forward pass and dx run at 60-200 GFLOP/s on maps of 4x4 and more
  with YNNPACK, 100-220 with Eigen (32x32x16 layers, the slowest, at about
  100 with both), but at 1-3 GFLOP/s on 2x2 maps with both, where one
  im2col matmul (patches (N*Ho*Wo, kh*kw*ci) @ kernel (kh*kw*ci, co)) runs
  all three products at 110-180: maps of at most `SMALL_MAP_PIXELS` pixels
  take it.
- XLA's dw first transposes x and dy channel-major, and inside a step it
  fuses into that transpose the batch norm, ReLU and residual sums that
  produced x, re-running them with strided reads: in ResNet-20 these
  transposes took 330 ms of a 590 ms step, and its dw convolutions ran at
  50-110 GFLOP/s besides. So 3x3 kernels take one matmul per tap for dw,
  window^T @ dy (window: the (N*Ho*Wo, ci) input pixels that tap (i, j)
  sees), and keep XLA's forward pass and dx: kh*kw strided copies of x and
  kh*kw products, no transpose. In isolation (experiments/conv_paths.py,
  part 1) XLA's dw is often the faster; in the steps it is not.
- The same transpose, fused with the batch norm and ReLU before it, took
  1.8 s of a 5 s ResNet-50 step (224x224, batch 16) in its 1x1
  convolutions, whose dw is a single matmul, x^T @ dy: 1x1 kernels take
  that ('matmul'), and the step took 3.4-3.5 s instead of 5.0 (NiN at
  32x32: 2.0 s instead of 3.4; GoogLeNet at 96x96: unchanged). XLA's
  forward and dx 1x1 convolutions themselves ran at 28-74 GFLOP/s on
  ResNet-50's and ResNet-20-sized shapes ((16,56,56,64<->256),
  (16,28,28,512->128), (128,8,8,256->64)) where the same products as
  plain matmuls ('im2col': a reshape and a dot) ran at 40-164: with those
  as well, ResNet-50's step took 3.07 s against 3.53, NiN's 1.46 against
  1.70, GoogLeNet's 0.71 against 0.75.
- The per-tap products are thin (16x16 to 512x512 results summed over
  N*Ho*Wo = 512 to 131,072 rows) and the kh*kw window copies stream from
  memory: a `lax.scan` over chunks of the batch of at most
  `CHUNK_BYTES` of x ('chunked') builds and uses each chunk's windows
  while they are in cache. With YNNPACK's convolutions, dw at 32x32x16
  took 10 ms against 38, at 16x16x32 7 ms against 22, and ResNet-20's
  step was 1.04-1.14x faster, but VGG16-BN's was slower, so only layers of
  at most 32 channels took it. With Eigen's convolutions every 3x3 layer
  takes it: VGG16-BN's step 1,554-1,595 ms against 1,689 with one matmul
  per tap over the whole batch, ResNet-20's 355-368 against 368-381
  (alternating, one process). Chunks of 1 MiB did as well as or better
  than 256 KiB, 512 KiB, 2 MiB and 4 MiB on both.
- 3x3 layers at stride 1 with padding 1 ('SAME') in float32 take Winograd's
  F(4x4, 3x3) (`conv_winograd`): per 4x4 output block, 36 products per pair
  of channels instead of 144, as one batched matmul (36, tiles, ci) @ (36,
  ci, co) between linear transforms of the input tiles, the kernel and the
  products. Its kernel gradient is the same products transposed, sum over
  tiles of tiles^T @ (transformed dy), 36 matmuls whose sums run over N*tiles
  rows ('winograd' dw). The transforms stream through memory, so the forward
  pass and dx take it from 128 input and output channels on (at batch 128,
  forward alone: 16x16x128 44 against 54 ms, 8x8x256 31 against 64, 4x4x512
  26 against 48, but 32x32x64 89-122 against 60 and 32x32x16 11-15 against
  7). dx is the forward pass of dy with the kernel flipped and its channels
  swapped. Whole steps, alternating in one process: VGG16-BN 909 against
  1,500 ms, ResNet-20 339 against 352, ResNet-50 (224x224, batch 16) 2.41
  against 2.73 s, with Winograd's dw in every such layer; layers with fewer
  than 32 input or output channels now keep the chunked dw (ResNet-20's
  16-channel stage, first layers): ResNet-20 312-328 against 339-346 ms,
  VGG16-BN 948 against 979. Winograd's transforms cost float32 some accuracy
  (~3e-6 of the largest value against 1e-7 for a direct sum,
  tests/test_layers.py), and would cost bfloat16 too much: bfloat16 keeps the
  paths below. They also cost compile time: XLA compiles each of a
  transform's 36 terms as its own loop (VGG16-BN's step compiles in 17-18 s
  against 5; as matmuls with the Kronecker products of the matrices the
  transforms compiled faster, but ran slower on ResNet-20, 361 against 342
  ms).
- Thin inputs. XLA's convolutions are slow on one input channel and
  into a few output channels: LeNet-5's C1 (128x28x28x1 -> 6, 5x5) forward
  pass took 4.9 ms, C3's dx (into 128x14x14x6 from 16 channels) 3.1-3.5.
  With one input channel the shifted forward pass is elementwise
  multiply-adds (C1 0.36-0.49 ms, 3x3 to 16 channels 1.1 against 3.6),
  but XLA fuses them into the pooling after them and into its derivative,
  recomputing every tap there (the step took 13.6 ms against 7.4): layers
  of one input channel and at most 32 output channels run it in a loop
  over chunks of the batch ('chunked' forward), whose boundary fusion does
  not cross (with 64 outputs it ties at 3x3 and loses with strided 7x7
  and 11x11 kernels, 36 against 19 ms). Layers of at most 8 input
  channels take the shifted dx, per tap a matmul dy @ kernel_tap^T added
  into dx at its shift: in isolation im2col's (one matmul dy @ kernel^T,
  then kh*kw shifted sums) was the faster for C3 (1.2-1.5 ms against
  2.1; XLA 3.1-3.5; at 16 channels XLA wins, 5.4 against 8.9 and 8.1),
  but in LeNet-5's step the shifted one is (7.4-7.7 ms against 8.1-8.4,
  alternating). LeNet-5's step with both: 7.4 ms against 12.4.
- oneDNN. Where its convolutions are available (`onednn.py`: oneDNN 3.2,
  the library behind PyTorch's CPU convolutions, as XLA custom calls),
  float32 layers with fewer than `ONEDNN_MAX_CHANNELS` (128) channels on
  either side take them for all three passes, before every rule above.
  In isolation at batch 128, with two of XLA's threads busy elsewhere:
  32x32x16 -> 16 forward / dx / dw 7.0 / 7.5 / 5.6 ms against XLA's 9.7 /
  9.6 / 13.0; LeNet-5's C1 0.37 / 2.2 / 0.36 against 5.8 / 7.0 / 1.0. In
  whole steps (alternating): ResNet-20 312 -> 204 ms, LeNet-5 9.6 -> 7.7,
  VGG16-BN 1,031 -> 900, ResNet-50 (224x224, batch 16) 2,529 -> 2,315.
  oneDNN on every layer was slower on the wide ones (VGG16-BN 1,210
  against 971 ms, ResNet-50 2,470), and so was a threshold of 256
  (VGG16-BN 949 against 887). Each call runs on XLA's own threads, its
  batch split between them (`onednn`): on oneDNN's OpenMP threads the
  calls competed with XLA's for the cores. The three paths' compile time
  is also lower: ResNet-20 3 s against 8.
- Steps, img/s, four runs of experiments/conv_paths.py (medians of
  alternating rounds; the machine drifts by up to 20% between runs, the
  ratios less): ResNet-20, XLA 172-209, the previous choice (im2col for up
  to 64 input channels, JAX's derivative) 138-165, these paths 198-256
  (1.14-1.27x XLA); VGG16-BN at 32x32, XLA 14, previous 47-56, these
  paths 63-65. LeNet-5 kept XLA's paths then (5,700-7,200 img/s; the
  thin-input paths above came later, with Eigen's convolutions). For
  reference, PyTorch 2.13 eager was measured on this machine at 539, 100
  and 11,981 img/s.
- Tried and left out, slower in the steps: dw as one matmul over im2col
  patches (XLA builds them at ~10 GB/s: 9 window copies, then their
  concatenation), the same with the patches or dy^T made channel-major so
  that YNNPACK runs the product (its 130-200 GFLOP/s do not pay for the
  extra copies), that matmul over chunks of the batch as 'chunked' does
  (VGG16-BN 1,580-1,615 ms against 1,554-1,595), the padded map flattened
  so that every tap is a contiguous range of rows (more FLOPs and copies),
  the batch split in two for two threads, and, for LeNet-5, im2col and
  shifted matmuls.
- Not in this module's reach: XLA maps its scratch memory afresh at every
  step, and the page faults cost ~1.3 us per 4 KiB (90-200 ms per step in
  ResNet-20 and VGG16). glibc's MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
  removes them but slows these paths' steps more than it saves (ResNet-20
  187 against 256 img/s; XLA's own 211 against 209). Huge pages for malloc
  do pay, and tcmalloc, which keeps freed memory, more (cnn_lab/malloc.py:
  the command-line entry points re-run themselves on one of them).
"""

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.errors import ConfigError, check_choice
from cnn_lab import onednn

Array = jax.Array

# On CPU, output maps of at most this many pixels take im2col matmuls for
# all three products (3x3, 512->512 on 2x2 maps: XLA 1-2 GFLOP/s, im2col
# 110-180; on 4x4 maps XLA is as fast).
SMALL_MAP_PIXELS = 15

# On CPU, kernels of at most this many taps take one matmul per tap for
# their kernel gradient; larger ones (5x5 and up) keep XLA's, whose
# transposes cost less than 25 or more copies of x.
SHIFTED_DW_MAX_TAPS = 9
# Those per-tap kernel gradients run over chunks of the batch whose input
# takes at most CHUNK_BYTES (module docstring); so does the forward pass of
# one input channel ('chunked'), by its output.
CHUNK_BYTES = 1024 * 1024

# On CPU, layers of at most this many input channels take the shifted dx
# (per tap, a matmul dy @ kernel_tap^T added into dx at its shift), and
# layers of one input channel and at most CHUNKED_FWD_MAX_CHANNELS output
# channels the shifted forward pass, over chunks of the batch (multiply-adds
# in one loop): module docstring.
THIN_DX_CHANNELS = 8
CHUNKED_FWD_MAX_CHANNELS = 32

CONV_IMPLS = ('auto', 'fast', 'xla', 'shifted', 'im2col', 'onednn')

XLA_PATHS = ('xla', 'xla', 'xla')


def _explicit_padding(padding, in_hw, kernel_hw, strides):
  if isinstance(padding, str):
    return lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]


def conv_geometry(in_hw, kernel_hw, strides, padding):
  """Explicit ((low, high), (low, high)) padding, as a hashable tuple, and
  the output map size (out_h, out_w)."""
  pads = tuple(tuple(int(v) for v in p)
               for p in _explicit_padding(padding, in_hw, kernel_hw, strides))
  out_hw = tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in
                 zip(in_hw, pads, kernel_hw, strides))
  return pads, out_hw


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
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
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


def conv_xla(x: Array, kernel: Array, strides: Sequence[int],
             padding) -> Array:
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  return lax.conv_general_dilated(
      x, kernel, tuple(strides), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast
# Algorithms for Convolutional Neural Networks", 2016; interpolation points
# 0, 1, -1, 2, -2 and infinity). A 4x4 block of a 3x3 convolution's output
# is A^T [(G g G^T) * (B^T d B)] A for the 6x6 input tile d under it and the
# kernel g: 36 products per pair of channels instead of 144, at the price of
# three linear maps (adds and scalings) that are cheap next to the products
# when both channel counts are large.
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
# On CPU, 3x3 layers (stride 1, one pixel of padding, float32) with at
# least this many input and output channels take Winograd's forward pass
# and dx; below it the transforms, which stream through memory, cost more
# than the products they save (module docstring).
WINOGRAD_MIN_CHANNELS = 128
# The same for their dw; below it, dw takes the per-tap matmuls over chunks
# of the batch ('chunked').
WINOGRAD_DW_MIN_CHANNELS = 32

# oneDNN's convolutions (`onednn.py`), all three passes, for float32 layers
# with fewer than this many channels on either side; wider ones keep the
# paths below (Winograd's, XLA's). In whole steps, against no oneDNN:
# ResNet-20 312 -> 204 ms, VGG16-BN 1,031 -> 900, ResNet-50 (224x224, batch
# 16) 2,529 -> 2,315; oneDNN on every layer: VGG16-BN 1,210 against 971,
# ResNet-50 2,470; threshold 256: VGG16-BN 949 against 887 at 128.
ONEDNN_MAX_CHANNELS = 128
ONEDNN_PATHS = ('onednn', 'onednn', 'onednn')


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
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
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


# Forward paths (and, differentiated by JAX, dx paths; conv_paths computes
# Winograd's dx as the forward pass of dy with the flipped kernel).
CONV_FNS = {'xla': conv_xla, 'shifted': conv_shifted, 'im2col': conv_im2col,
            'chunked': conv_chunked, 'winograd': conv_winograd,
            'onednn': onednn.conv}


def kernel_grad_xla(x, dy, kernel_shape, strides, pads):
  kernel = jnp.zeros(kernel_shape, x.dtype)
  return jax.vjp(lambda k: conv_xla(x, k, strides, pads), kernel)[1](dy)[0]


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


KERNEL_GRAD_FNS = {'xla': kernel_grad_xla, 'matmul': kernel_grad_matmul,
                   'shifted': kernel_grad_shifted,
                   'chunked': kernel_grad_chunked,
                   'winograd': kernel_grad_winograd,
                   'onednn': onednn.kernel_grad}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_paths(x: Array, kernel: Array, strides, pads, paths) -> Array:
  """Convolution (NHWC, HWIO) whose forward pass, input gradient and kernel
  gradient each take their own path, `paths` = (forward, dx, dw): forward
  and dx among CONV_FNS (dx is JAX's derivative of that path), dw among
  KERNEL_GRAD_FNS. `strides` and `pads` are tuples (explicit padding, as
  `conv_geometry` gives)."""
  return CONV_FNS[paths[0]](x, kernel, strides, pads)


def _conv_paths_fwd(x, kernel, strides, pads, paths):
  # Only x and the kernel are kept: the windows (kh*kw times x) are
  # rebuilt in the backward pass rather than held from forward to backward.
  return conv_paths(x, kernel, strides, pads, paths), (x, kernel)


def _conv_paths_bwd(strides, pads, paths, residuals, dy):
  x, kernel = residuals
  _, dx_path, dw_path = paths
  if dx_path == 'winograd':
    # A stride-1 'SAME' 3x3 convolution's dx is the same convolution of dy
    # with the kernel flipped in space and its channels swapped; JAX's
    # derivative of the transforms would run as scatters.
    dx = conv_winograd(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3),
                       strides, pads)
  elif dx_path == 'onednn':
    dx = onednn.input_grad(dy, kernel, x.shape, strides, pads)
  else:
    dx = jax.vjp(lambda a: CONV_FNS[dx_path](a, kernel, strides, pads),
                 x)[1](dy)[0]
  if dw_path not in ('xla', 'onednn') and (kernel.shape[:2] != (1, 1) or
                                           strides != (1, 1)):
    # The windows depend on x alone, so XLA would build those of every
    # layer as soon as x exists and hold them all until the backward pass
    # (3x the step's memory in ResNet-20); optimization_barrier does not
    # stop it (XLA's CPU compiler drops barriers before scheduling). Adding
    # dy[0] * 0 (fused into the copies; XLA keeps x * 0 for floats, which
    # is NaN where x is not finite) ties them to dy: each layer's are built
    # just before its products. A 1x1 kernel at stride 1 needs no tie: its
    # one window is x itself, held for the backward pass anyway.
    x = x + dy.reshape(-1)[0] * 0
  dw = KERNEL_GRAD_FNS[dw_path](x, dy, kernel.shape, strides, pads)
  return dx, dw.astype(kernel.dtype)


conv_paths.defvjp(_conv_paths_fwd, _conv_paths_bwd)


def select_conv_paths(backend: str, x_shape, kernel_shape, strides,
                      padding, dtype=jnp.float32, with_onednn: bool = False
                      ) -> tuple[str, str, str]:
  """The (forward, dx, dw) paths of `conv2d(impl='auto')`, a function of
  the backend, the shapes, the compute dtype and whether oneDNN's
  convolutions are available (`onednn.available()`) alone (module
  docstring)."""
  kh, kw, ci, co = kernel_shape
  if backend != 'cpu':
    return XLA_PATHS
  if (with_onednn and jnp.dtype(dtype) == jnp.float32 and
      min(ci, co) < ONEDNN_MAX_CHANNELS):
    return ONEDNN_PATHS
  if kh * kw == 1:
    return ('im2col', 'im2col', 'matmul')
  pads, (out_h, out_w) = conv_geometry(x_shape[1:3], (kh, kw), strides,
                                       padding)
  if out_h * out_w <= SMALL_MAP_PIXELS:
    return ('im2col', 'im2col', 'matmul')
  if (jnp.dtype(dtype) == jnp.float32 and
      winograd_applies((kh, kw), strides, pads)):
    # (Its transforms' constants, up to 8 and 1/24, would lose too much in
    # bfloat16.)
    fwd = 'winograd' if min(ci, co) >= WINOGRAD_MIN_CHANNELS else 'xla'
    dw = 'winograd' if min(ci, co) >= WINOGRAD_DW_MIN_CHANNELS else 'chunked'
    dx = fwd
  elif kh * kw <= SHIFTED_DW_MAX_TAPS:
    fwd, dx, dw = 'xla', 'xla', 'chunked'
  else:
    fwd, dx, dw = XLA_PATHS
  # Thin inputs: XLA's convolutions run slowly both on one input channel
  # and into a few output channels (dx).
  if ci == 1 and co <= CHUNKED_FWD_MAX_CHANNELS:
    fwd = 'chunked'
  if ci <= THIN_DX_CHANNELS:
    dx = 'shifted'
  return fwd, dx, dw


def conv2d(x: Array, kernel: Array, strides: Sequence[int] = (1, 1),
           padding='SAME', impl: str = 'auto') -> Array:
  """2-D convolution, NHWC input and HWIO kernel.

  impl: 'auto' (by backend and shape, `select_conv_paths`); 'fast' (the
  CPU's choice of 'auto' on any backend); 'onednn' (oneDNN's convolutions
  for all three products: float32 on the CPU only); or one path for the
  forward pass, differentiated by JAX: 'xla', 'shifted', 'im2col'.
  """
  strides = tuple(int(s) for s in strides)
  if impl not in ('auto', 'fast', 'onednn'):
    return CONV_FNS[impl](x, kernel, strides, padding)
  pads, _ = conv_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
  on_cpu = jax.default_backend() == 'cpu'
  if impl == 'onednn':
    if not on_cpu or x.dtype != jnp.float32:
      raise ConfigError(
          f"conv_impl='onednn' runs float32 on the CPU only, not "
          f"{x.dtype.name} on {jax.default_backend()}: use 'auto'")
    return conv_paths(x, kernel, strides, pads, ONEDNN_PATHS)
  paths = select_conv_paths(
      jax.default_backend() if impl == 'auto' else 'cpu', x.shape,
      kernel.shape, strides, pads, x.dtype, on_cpu and onednn.available())
  if paths == XLA_PATHS:
    return conv_xla(x, kernel, strides, pads)
  return conv_paths(x, kernel, strides, pads, paths)


class Conv(nn.Module):
  """Drop-in for `nn.Conv` (NHWC input, HWIO kernel) using `conv2d`. The
  parameters are stored in `param_dtype`; input, kernel and bias are cast to
  `dtype` and the convolution runs (and returns) in it, as in `nn.Conv`."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = 'auto'
  dtype: Any = jnp.float32  # Computation.
  param_dtype: Any = jnp.float32  # Stored weights.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype)
    y = conv2d(x, kernel, self.strides, self.padding, self.impl)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'relu': nn.relu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
}

KERNEL_INITS = ('he_normal', 'he_uniform', 'glorot_normal', 'glorot_uniform',
                'lecun_normal', 'lecun_uniform', 'normal', 'truncated_normal')

NORMS = ('none', 'batch')

# `model.dtype`: the dtype convolutions, dense layers and activations compute
# in. Parameters, batch-norm statistics and the loss stay float32 either way.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def get_activation(name: str) -> Callable[[Array], Array]:
  check_choice('model.activation', name, tuple(ACTIVATIONS))
  return ACTIVATIONS[name]


def get_dtype(name: str):
  """The compute dtype named by `model.dtype` ('float32', 'bfloat16')."""
  check_choice('model.dtype', name, tuple(DTYPES))
  return DTYPES[name]


# Variable collections that `Activation` fills when the caller makes them
# mutable (cnn_lab.train does; inference and `init` leave them alone, so the
# statistics cost nothing there).
ACTIVATION_STATS = 'activation_stats'  # A few scalars per site.
ACTIVATION_VALUES = 'activations'  # The whole tensor (histograms).


class Activation(nn.Module):
  """An activation function, and a named site where cnn_lab watches the
  network's activations (`metrics.activation_stats`): every model applies
  its nonlinearity through this module, named after the layer it follows
  (`block1_act1`, `stage1_block1/act_out`). It holds no parameters."""
  kind: str = 'relu'

  def __call__(self, x: Array) -> Array:
    y = get_activation(self.kind)(x)
    if self.is_initializing():
      return y
    if self.is_mutable_collection(ACTIVATION_STATS):
      # Inside a jitted step these are reductions of a tensor it already
      # holds; stop_gradient keeps them out of the backward pass.
      from cnn_lab import metrics  # metrics imports nothing of cnn_lab.
      stats = metrics.activation_stats(lax.stop_gradient(y), self.kind)
      for key, value in stats.items():
        self.put_variable(ACTIVATION_STATS, key, value)
    if self.is_mutable_collection(ACTIVATION_VALUES):
      self.put_variable(ACTIVATION_VALUES, 'value', lax.stop_gradient(y))
    return y


def get_kernel_init(name: str, std: float = 0.01) -> Callable:
  """He (Kaiming), Glorot (Xavier), LeCun (all with fan-in of the forward
  map), N(0, std^2), or a normal of std `std` truncated at 2 std."""
  check_choice('model.kernel_init', name, KERNEL_INITS)
  inits = nn.initializers
  if name in ('normal', 'truncated_normal'):
    if (not isinstance(std, (int, float)) or isinstance(std, bool)
        or not math.isfinite(std) or not std > 0):
      raise ConfigError(f'model.init_std={std!r} is not allowed; it must be '
                        'a positive number')
    if name == 'truncated_normal':
      return inits.truncated_normal(stddev=std)
    return inits.normal(stddev=std)
  return {
      'he_normal': inits.he_normal(),
      'he_uniform': inits.he_uniform(),
      'glorot_normal': inits.glorot_normal(),
      'glorot_uniform': inits.glorot_uniform(),
      'lecun_normal': inits.lecun_normal(),
      'lecun_uniform': inits.lecun_uniform(),
  }[name]


# Weight of the old value in batch norm's moving averages:
# running = BN_MOMENTUM * running + (1 - BN_MOMENTUM) * batch.
BN_MOMENTUM = 0.9


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(f32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axes)
  raw_var = jnp.mean(lax.square(xf), axes) - lax.square(mean)
  var = jnp.maximum(0.0, raw_var)
  inv = lax.rsqrt(var + epsilon)
  mul = inv * scale
  y = (xf - mean) * mul + bias
  return (y, mean, var), (x, mean, raw_var, inv, mul, scale, bias)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  del epsilon  # In `inv`.
  x, mean, raw_var, inv, mul, scale, bias = residuals
  g, d_mean, d_var = cotangents
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  xf, g = x.astype(f32), g.astype(f32)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  sum_g = jnp.sum(g, axes)
  # sum g * (x - mean), from two sums XLA computes side by side.
  sum_gxc = jnp.sum(g * xf, axes) - mean * sum_g
  # var = max(0, raw_var) passes the gradient where raw_var > 0 (half of it
  # at 0, as JAX's maximum does).
  passes = jnp.where(raw_var > 0, 1.0, jnp.where(raw_var == 0, 0.5, 0.0))
  d_var = (d_var - 0.5 * mul * inv * inv * sum_gxc) * passes
  d_mean = d_mean - mul * sum_g
  # d var / d x = 2 (x - mean) / count, d mean / d x = 1 / count.
  slope = 2.0 * d_var / count
  dx = mul * g + slope * xf + (d_mean / count - slope * mean)
  return (dx.astype(x.dtype), (sum_gxc * inv).astype(scale.dtype),
          sum_g.astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float
                     ) -> tuple[Array, Array, Array]:
  """Training-mode batch norm over all axes but the last: (y, batch mean,
  batch variance), in float32 (at least). The values are flax's
  (`nn.BatchNorm`: statistics in float32, variance E[x^2] - E[x]^2 clipped
  at 0, y = (x - mean) * rsqrt(var + eps) * scale + bias); the gradient is
  the same function's, written out so that XLA computes it in fewer passes
  over the activations (`BatchNorm`)."""
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.BatchNorm):
  """flax's `nn.BatchNorm` over the last axis, with the same variables
  (params scale, bias; batch_stats mean, var), the same values in training
  and evaluation, and the same moving averages, whose training-mode
  gradient is written out (`batch_norm_train`) rather than derived by JAX.

  JAX's derivative of flax's batch norm keeps x - mean from the forward pass
  and reduces the incoming gradient three times; written out, the backward
  pass is two sums (of g and of g * x, which XLA computes side by side) and
  one elementwise map, dx = mul * g + slope * x + shift per channel. Batch
  norm with ReLU, forward and backward at batch 128 (alternating, 2-core
  AMD EPYC (AVX2), tcmalloc): 32x32x16 3.4 against 5.6 ms, 16x16x32 1.2
  against 2.0, 8x8x64 0.68 against 0.81; ResNet-20's step 405 against 422
  ms (medians of 7 alternating rounds). Summing g * (x - mean) instead
  made XLA keep x - mean again (4.7 ms at 32x32x16). The forward pass and
  the moving averages are flax's to the bit; the gradients agree to a few
  float32 ulps of the largest entry (tests/test_layers.py), except that
  sum(g * x) - mean * sum(g), like flax's fast variance in the forward
  pass, loses digits in channels whose |mean| is many times their std.

  Only what cnn_lab uses is supported: features on the last axis, no
  `axis_name` (single device), no `mask`, flax's fast variance, scale and
  bias on, statistics in float32.
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    if (self.axis not in (-1, x.ndim - 1) or self.axis_name is not None
        or mask is not None or not self.use_fast_variance
        or not (self.use_scale and self.use_bias)
        or not self.force_float32_reductions):
      raise NotImplementedError(
          'cnn_lab.layers.BatchNorm supports the last axis, one device, no '
          'mask, fast variance, scale and bias and float32 statistics only')
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var',
                           lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    out_dtype = self.dtype or jnp.result_type(x, scale, bias)
    if use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x - ra_mean.value) * mul + bias).astype(out_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1 - self.momentum) * mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)


def make_norm(norm: str, train: bool, name: str, epsilon: float = 1e-5,
              dtype: Any = jnp.float32) -> Callable[[Array], Array]:
  """Batch norm over (N, H, W) per channel, with a learnable scale and shift;
  batch statistics in training, moving averages in evaluation. Whatever
  `dtype` (that of its output), the batch mean and variance are computed in
  float32, and scale, shift and moving averages are kept in float32
  (`BatchNorm`: flax's, with its training-mode gradient written out)."""
  if norm == 'batch':
    return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                     name=name)
  return lambda x: x


# Inputs smaller than this take each family's small-input (CIFAR-style) stem:
# 28x28 and 32x32 images; 64x64 and up use the ImageNet layout.
SMALL_INPUT = 64


def is_small_input(x: Array) -> bool:
  return min(x.shape[1:3]) < SMALL_INPUT


def check_input_size(x: Array, minimum: int, model: str, why: str) -> None:
  """Raises ConfigError (at trace time, before compiling) for inputs that
  the network's downsampling would shrink to nothing."""
  if min(x.shape[1:3]) < minimum:
    raise ConfigError(
        f'data.image_size={min(x.shape[1:3])} is too small for {model}: it '
        f'needs inputs of at least {minimum}x{minimum} ({why})')


def scale_width(channels: int, width: float) -> int:
  """Channels of a layer under the width multiplier (at least one)."""
  return max(1, int(round(channels * width)))


def _pool_padding(padding, size: int, window: int, stride: int):
  """Explicit (low, high) padding; 'CEIL' gives PyTorch's ceil_mode=True."""
  if padding == 'CEIL':
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:  # The last window must start inside.
      out -= 1
    return (0, max(0, (out - 1) * stride + window - size))
  if isinstance(padding, int):
    return (padding, padding)
  raise ValueError(padding)


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


def max_pool(x: Array, window: int = 2, stride: int | None = None,
             padding='VALID') -> Array:
  """Max pooling (NHWC). Non-overlapping windows that tile the map exactly
  take `tiled_max_pool` (the same values and gradients as a reshape and a
  max; XLA's select-and-scatter backward was about 8x slower still on CPU).
  `padding`: 'VALID', 'SAME', an int on every side, or 'CEIL' (PyTorch's
  ceil_mode: a last, partial window when the map does not divide)."""
  stride = stride or window
  n, h, w, c = x.shape
  if stride == window and padding == 'VALID' and h % window == 0 and (
      w % window == 0):
    return tiled_max_pool(x, window)
  if not isinstance(padding, str) or padding == 'CEIL':
    padding = (_pool_padding(padding, h, window, stride),
               _pool_padding(padding, w, window, stride))
  return nn.max_pool(x, (window, window), (stride, stride), padding)


def avg_pool(x: Array, window: int, stride: int | None = None,
             padding='VALID') -> Array:
  """Average pooling (NHWC). Explicit padding cells count as zeros; the
  extra cells of 'CEIL' mode do not (the last window averages what it
  covers, as in Caffe and PyTorch)."""
  stride = stride or window
  include_pad = padding != 'CEIL'
  if not isinstance(padding, str) or padding == 'CEIL':
    padding = (_pool_padding(padding, x.shape[1], window, stride),
               _pool_padding(padding, x.shape[2], window, stride))
  # Without the padding cells flax divides by a float32 count: keep x's dtype.
  return nn.avg_pool(x, (window, window), (stride, stride), padding,
                     count_include_pad=include_pad).astype(x.dtype)


def adaptive_avg_pool(x: Array, out_size: int) -> Array:
  """Average over out_size x out_size cells, cell i covering rows
  floor(i*H/out) to ceil((i+1)*H/out) (PyTorch's AdaptiveAvgPool2d, which
  GoogLeNet's auxiliary heads and AlexNet's head use)."""
  n, h, w, c = x.shape
  if h == out_size and w == out_size:
    return x
  if h % out_size == 0 and w % out_size == 0:
    return x.reshape(n, out_size, h // out_size, out_size, w // out_size,
                     c).mean(axis=(2, 4))

  def bounds(size, i):
    return (i * size) // out_size, -(-((i + 1) * size) // out_size)

  rows = []
  for i in range(out_size):
    r0, r1 = bounds(h, i)
    rows.append(jnp.stack([
        x[:, r0:r1, slice(*bounds(w, j))].mean(axis=(1, 2))
        for j in range(out_size)], axis=1))
  return jnp.stack(rows, axis=1)


def global_avg_pool(x: Array) -> Array:
  return x.mean(axis=(1, 2))


def local_response_norm(x: Array, size: int = 5, k: float = 2.0,
                        alpha: float = 1e-4, beta: float = 0.75) -> Array:
  """AlexNet's local response normalisation across channels (Krizhevsky et
  al. 2012, Sec. 3.3): x / (k + alpha * sum of x^2 over `size` neighbouring
  channels)^beta, with the paper's constants. The denominator is computed
  in float32 whatever x's dtype: in bfloat16 (8 significant bits) k = 2
  would absorb alpha * sum until the sum reaches about 80."""
  sq = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
  half = size // 2
  padded = jnp.pad(sq, ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
  c = x.shape[-1]
  window_sum = sum(padded[..., i:i + c] for i in range(size))
  return (x / (k + alpha * window_sum) ** beta).astype(x.dtype)
