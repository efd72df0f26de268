"""The convolution's path selector.

How a convolution's forward pass, its input gradient (dx) and its kernel
gradient (dw) are computed, picked by backend and shape
(`select_conv_paths`; `conv_paths` joins the three with a custom VJP;
`conv2d`, which `layers.Conv` calls, does both). On GPU/TPU all three are
XLA's convolution. On CPU, measured in whole training steps (batch 128,
float32) on a 2-core AMD EPYC (AVX-512) with jax 0.10.2, whose XLA runs
matmuls with YNNPACK and, once cnn_lab is imported, convolutions with
Eigen (cnn_lab/xla_flags.py; the figures below from before that change
were measured with YNNPACK's convolutions, and say so):

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
  tests/test_kernels.py), and would cost bfloat16 too much: bfloat16 keeps the
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
from typing import Sequence

import jax
import jax.numpy as jnp

from cnn_lab.errors import ConfigError
from cnn_lab.kernels import direct, onednn, winograd
from cnn_lab.kernels.geometry import conv_geometry
from cnn_lab.kernels.xla import conv_xla, kernel_grad_xla

Array = jax.Array

# On CPU, output maps of at most this many pixels take im2col matmuls for
# all three products (3x3, 512->512 on 2x2 maps: XLA 1-2 GFLOP/s, im2col
# 110-180; on 4x4 maps XLA is as fast).
SMALL_MAP_PIXELS = 15

# On CPU, kernels of at most this many taps take one matmul per tap for
# their kernel gradient; larger ones (5x5 and up) keep XLA's, whose
# transposes cost less than 25 or more copies of x.
SHIFTED_DW_MAX_TAPS = 9

# On CPU, layers of at most this many input channels take the shifted dx
# (per tap, a matmul dy @ kernel_tap^T added into dx at its shift), and
# layers of one input channel and at most CHUNKED_FWD_MAX_CHANNELS output
# channels the shifted forward pass, over chunks of the batch (multiply-adds
# in one loop): module docstring.
THIN_DX_CHANNELS = 8
CHUNKED_FWD_MAX_CHANNELS = 32

CONV_IMPLS = ('auto', 'fast', 'xla', 'shifted', 'im2col', 'onednn')

XLA_PATHS = ('xla', 'xla', 'xla')

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
# other rules of `select_conv_paths` (Winograd's, XLA's). In whole steps,
# against no oneDNN: ResNet-20 312 -> 204 ms, VGG16-BN 1,031 -> 900,
# ResNet-50 (224x224, batch 16) 2,529 -> 2,315; oneDNN on every layer:
# VGG16-BN 1,210 against 971, ResNet-50 2,470; threshold 256: VGG16-BN 949
# against 887 at 128.
ONEDNN_MAX_CHANNELS = 128
ONEDNN_PATHS = ('onednn', 'onednn', 'onednn')

# Forward paths (and, differentiated by JAX, dx paths; conv_paths computes
# Winograd's dx as the forward pass of dy with the flipped kernel).
CONV_FNS = {'xla': conv_xla, 'shifted': direct.conv_shifted,
            'im2col': direct.conv_im2col, 'chunked': direct.conv_chunked,
            'winograd': winograd.conv_winograd, 'onednn': onednn.conv}

KERNEL_GRAD_FNS = {'xla': kernel_grad_xla,
                   'matmul': direct.kernel_grad_matmul,
                   'shifted': direct.kernel_grad_shifted,
                   'chunked': direct.kernel_grad_chunked,
                   'winograd': winograd.kernel_grad_winograd,
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
    dx = winograd.conv_winograd(
        dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), strides, pads)
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
      winograd.winograd_applies((kh, kw), strides, pads)):
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
