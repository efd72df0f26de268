"""Building blocks shared by every architecture: convolution, activations,
initialisers, normalisation, pooling.

Each block is what a model calls; how its heavy ops run (the convolution's
paths on the CPU, tiled max pooling, batch norm's written-out gradient) is
`cnn_lab.kernels`' business, reached through `kernels.conv2d`,
`kernels.max_pool` and `kernels.batch_norm_train`.
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab import kernels
from cnn_lab.errors import ConfigError, check_choice

Array = jax.Array


class Conv(nn.Module):
  """Drop-in for `nn.Conv` (NHWC input, HWIO kernel) using `kernels.conv2d`
  (`impl`: one of `kernels.CONV_IMPLS`). The parameters are stored in
  `param_dtype`; input, kernel and bias are cast to `dtype` and the
  convolution runs (and returns) in it, as in `nn.Conv`."""
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
    y = kernels.conv2d(x, kernel, self.strides, self.padding, self.impl)
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


class Activation(nn.Module):
  """An activation function, and a named site where cnn_lab watches the
  network's activations: every model applies its nonlinearity through this
  module, named after the layer it follows (`block1_act1`,
  `stage1_block1/act_out`). It holds no parameters and computes nothing
  else; `metrics.watch_activations` records what its calls return."""
  kind: str = 'relu'

  def __call__(self, x: Array) -> Array:
    return get_activation(self.kind)(x)


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


class BatchNorm(nn.BatchNorm):
  """flax's `nn.BatchNorm` over the last axis, with the same variables
  (params scale, bias; batch_stats mean, var), the same values in training
  and evaluation, and the same moving averages, whose training-mode
  gradient is written out (`kernels.batch_norm_train`) rather than derived
  by JAX: fewer passes over the activations.

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
    y, mean, var = kernels.batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1 - self.momentum) * mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)


def make_norm(norm: str, train: bool, name: str, epsilon: float = 1e-5,
              dtype: Any = jnp.float32, momentum: float = BN_MOMENTUM
              ) -> Callable[[Array], Array]:
  """Batch norm over (N, H, W) per channel, with a learnable scale and shift;
  batch statistics in training, moving averages in evaluation. Whatever
  `dtype` (that of its output), the batch mean and variance are computed in
  float32, and scale, shift and moving averages are kept in float32
  (`BatchNorm`). `momentum` is the old value's weight in the moving
  averages (PyTorch's `momentum` is one minus it)."""
  if norm == 'batch':
    return BatchNorm(use_running_average=not train, momentum=momentum,
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



def max_pool(x: Array, window: int = 2, stride: int | None = None,
             padding='VALID') -> Array:
  """Max pooling (NHWC). `padding`: 'VALID', 'SAME', an int on every side,
  or 'CEIL' (PyTorch's ceil_mode: a last, partial window when the map does
  not divide). Windows that tile the map run faster (`kernels.max_pool`)."""
  stride = stride or window
  _, h, w, _ = x.shape
  if not isinstance(padding, str) or padding == 'CEIL':
    padding = (_pool_padding(padding, h, window, stride),
               _pool_padding(padding, w, window, stride))
  return kernels.max_pool(x, window, stride, padding)


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
