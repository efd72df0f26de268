"""Building blocks shared by every architecture: convolution, activations,
initialisers, normalisation.

`Conv` is the one convolution layer of cnn_lab. It holds the same variables
as `flax.linen.Conv` (`kernel` HWIO, `bias`) and picks the implementation by
backend and shape: XLA's CPU convolution runs 3x3 kernels on very small
feature maps (2x2) at a few GFLOP/s, against 60-180 GFLOP/s on larger ones,
while the same convolution written as a sum of kh*kw shifted matrix products
keeps matmul speed there; and on large maps with few channels (32x32x64) its
weight gradient is slow, where one im2col matmul is 2-3x faster. On GPU/TPU,
and on CPU wherever XLA is fast, XLA's own convolution is used.
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab.errors import ConfigError, check_choice

Array = jax.Array

# On CPU, output maps with fewer pixels than this take the shifted-matmul
# path (measured: 512->512 3x3 on 2x2 maps, XLA 2 GFLOP/s vs 64 shifted;
# on 4x4 maps XLA is as fast or faster).
SHIFTED_MAX_PIXELS = 15

# On CPU, inputs with at most this many channels take the im2col path
# (measured: 32x32 maps, 64->64 channels, batch 64, forward and backward:
# XLA 18-23 GFLOP/s, im2col 56).
IM2COL_MAX_CHANNELS = 64

CONV_IMPLS = ('auto', 'xla', 'shifted', 'im2col')


def _explicit_padding(padding, in_hw, kernel_hw, strides):
  if isinstance(padding, str):
    return lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]


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


def conv_shifted(x: Array, kernel: Array, strides: Sequence[int],
                 padding) -> Array:
  """2-D convolution (NHWC, HWIO) as a sum of kh*kw shifted matmuls."""
  kh, kw, ci, co = kernel.shape
  out = None
  for window, k in zip(_windows(x, (kh, kw), strides, padding),
                       kernel.reshape(kh * kw, ci, co)):
    term = jnp.einsum('nhwc,co->nhwo', window, k)
    out = term if out is None else out + term
  return out


def conv_im2col(x: Array, kernel: Array, strides: Sequence[int],
                padding) -> Array:
  """2-D convolution as one matmul over the stacked windows (im2col).

  With few input channels the shifted matmuls are too thin to run at matmul
  speed; stacking the kh*kw windows gives one product with kh*kw*ci terms,
  and its gradient with respect to the kernel is one large matmul too.
  """
  kh, kw, ci, co = kernel.shape
  patches = jnp.concatenate(_windows(x, (kh, kw), strides, padding), axis=-1)
  return jnp.einsum('nhwc,co->nhwo', patches, kernel.reshape(kh * kw * ci, co))


def conv_xla(x: Array, kernel: Array, strides: Sequence[int],
             padding) -> Array:
  pads = _explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  return lax.conv_general_dilated(
      x, kernel, tuple(strides), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


CONV_FNS = {'xla': conv_xla, 'shifted': conv_shifted, 'im2col': conv_im2col}


def conv2d(x: Array, kernel: Array, strides: Sequence[int] = (1, 1),
           padding='SAME', impl: str = 'auto') -> Array:
  """Convolution that avoids XLA's slow CPU path on tiny maps (see module)."""
  if impl == 'auto':
    kh, kw = kernel.shape[:2]
    pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    out_h = (x.shape[1] + sum(pads[0]) - kh) // strides[0] + 1
    out_w = (x.shape[2] + sum(pads[1]) - kw) // strides[1] + 1
    impl = 'xla'
    if jax.default_backend() == 'cpu' and kh * kw > 1:
      if out_h * out_w <= SHIFTED_MAX_PIXELS:
        impl = 'shifted'
      elif x.shape[-1] <= IM2COL_MAX_CHANNELS:
        impl = 'im2col'
  return CONV_FNS[impl](x, kernel, strides, padding)


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


def make_norm(norm: str, train: bool, name: str, epsilon: float = 1e-5,
              dtype: Any = jnp.float32) -> Callable[[Array], Array]:
  """Batch norm over (N, H, W) per channel, with a learnable scale and shift;
  batch statistics in training, moving averages in evaluation. Whatever
  `dtype` (that of its output), flax computes the batch mean and variance in
  float32, and keeps scale, shift and moving averages in float32."""
  if norm == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=epsilon, dtype=dtype,
                        param_dtype=jnp.float32, name=name)
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


def max_pool(x: Array, window: int = 2, stride: int | None = None,
             padding='VALID') -> Array:
  """Max pooling (NHWC). Non-overlapping windows that tile the map exactly
  are a reshape and a max: the same values, and a backward pass about 8x
  faster on CPU than XLA's select-and-scatter (measured at 32x32x64).
  `padding`: 'VALID', 'SAME', an int on every side, or 'CEIL' (PyTorch's
  ceil_mode: a last, partial window when the map does not divide)."""
  stride = stride or window
  n, h, w, c = x.shape
  if stride == window and padding == 'VALID' and h % window == 0 and (
      w % window == 0):
    return x.reshape(n, h // window, window, w // window, window, c).max(
        axis=(2, 4))
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
