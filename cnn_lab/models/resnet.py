"""ResNets: He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition" (CVPR 2016).

`ResNet`: the ImageNet networks of Table 1. A 7x7/2 stem of 64 channels and
a 3x3/2 max-pool, four stages of 64, 128, 256, 512 channels (the first block
of stages 2-4 downsamples by 2), global average pooling and one linear
layer. Depths 18 and 34 stack basic blocks (two 3x3 convolutions); 50, 101
and 152 stack bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4). Batch
norm follows every convolution; the convolutions have no bias (they get one
with `norm='none'`). The default shortcut is the paper's option B (identity,
a 1x1 projection with batch norm where the shape changes), which is also
torchvision's: at 224x224x3 and 1000 classes the parameter counts equal
torchvision's `resnet18` ... `resnet152` (11,689,512 ... 60,192,808).

Stride placement in the bottleneck: the paper strides the first 1x1
convolution ("conv3_1, conv4_1, conv5_1 with a stride of 2"); torchvision
strides the 3x3 one (the "ResNet v1.5" change, a little more accurate and
about 6% more FLOPs). Parameter counts are the same either way; the default
`bottleneck_stride='1x1'` follows the paper, `'3x3'` gives torchvision's.

`CifarResNet`: the CIFAR-10 networks of Sec. 4.2, depth 6n+2 (20, 32, 44,
56, 110): a 3x3 stem of 16 channels, three stages of n basic blocks with 16,
32, 64 channels (on 32, 16, 8 maps), global average pooling, a linear layer.
The default shortcut is option A, as in the paper: identity, with a stride-2
subsampling and zero channels where the shape changes, so shortcuts add no
parameters (ResNet-20 has 0.27M parameters, ResNet-110 1.7M).

Knobs of both: `residual=False` drops every shortcut, giving the paper's
"plain" networks of the same depth (Fig. 3, 6; with option A the parameter
count is unchanged); `shortcut` 'A' (zero-padding identity), 'B' (projection
where the shape changes) or 'C' (projection on every shortcut);
`norm='none'`; `activation`; `kernel_init` (default He normal, the paper's
ref. [13], fan-in of the forward map); `width` multiplies all channels.

Small inputs (below 64x64) to the ImageNet networks: the stem is a 3x3/1
convolution and the max-pool is dropped (the usual CIFAR adaptation), so
stage 1 runs at the input resolution.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers
from cnn_lab.errors import ConfigError

IMAGENET_DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # The paper's; any 6n+2 works.


class Block(nn.Module):
  """A basic or bottleneck residual block (Fig. 2 and Fig. 5)."""
  features: int  # Output channels.
  stride: int
  bottleneck: bool
  residual: bool
  shortcut: str
  norm: str
  activation: str
  kernel_init: Callable
  bottleneck_stride: str = '1x1'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, *, train: bool):

    def conv(features, kernel, stride, name):
      return layers.Conv(features, (kernel, kernel), (stride, stride),
                         padding=kernel // 2, use_bias=self.norm == 'none',
                         kernel_init=self.kernel_init, impl=self.conv_impl,
                         dtype=self.dtype, name=name)

    if self.bottleneck:
      mid = self.features // 4
      s1, s3 = ((self.stride, 1) if self.bottleneck_stride == '1x1'
                else (1, self.stride))
      specs = [(mid, 1, s1), (mid, 3, s3), (self.features, 1, 1)]
    else:
      specs = [(self.features, 3, self.stride), (self.features, 3, 1)]
    y = x
    for i, (features, kernel, stride) in enumerate(specs, 1):
      y = conv(features, kernel, stride, f'conv{i}')(y)
      y = layers.make_norm(self.norm, train, f'bn{i}', dtype=self.dtype,
                           momentum=self.bn_momentum)(y)
      if i < len(specs):
        y = layers.Activation(self.activation, name=f'act{i}')(y)
    if self.residual:
      y = y + self._shortcut(x, conv, train)
    return layers.Activation(self.activation, name='act_out')(y)

  def _shortcut(self, x, conv, train):
    changes = self.stride != 1 or x.shape[-1] != self.features
    if self.shortcut == 'C' or (self.shortcut == 'B' and changes):
      x = conv(self.features, 1, self.stride, 'proj_conv')(x)
      return layers.make_norm(self.norm, train, 'proj_bn', dtype=self.dtype,
                              momentum=self.bn_momentum)(x)
    if not changes:
      return x
    if self.stride != 1:  # Option A: subsample and pad with zero channels.
      x = x[:, ::self.stride, ::self.stride, :]
    extra = self.features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2,
                                                extra - extra // 2)))


class ResNet(nn.Module):
  """ImageNet ResNet-18/34/50/101/152 (Table 1)."""
  depth: int = 50
  num_classes: int = 1000
  residual: bool = True
  shortcut: str = 'B'
  bottleneck_stride: str = '1x1'  # Paper: '1x1'; torchvision: '3x3'.
  norm: str = 'batch'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  activation: str = 'relu'
  kernel_init: str = 'he_normal'
  init_std: float = 0.01  # Only for kernel_init='normal'.
  width: float = 1.0
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  knob_choices = {'shortcut': ('A', 'B', 'C'),
                  'bottleneck_stride': ('1x1', '3x3'),
                  'depth': tuple(IMAGENET_DEPTHS)}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 28, f'resnet{self.depth}',
                            'the stem and three stride-2 stages')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    kind, counts = IMAGENET_DEPTHS[self.depth]
    w = lambda c: layers.scale_width(c, self.width)
    stem = (3, 1) if layers.is_small_input(x) else (7, 2)
    x = layers.Conv(w(64), (stem[0],) * 2, (stem[1],) * 2,
                    padding=stem[0] // 2, use_bias=self.norm == 'none',
                    kernel_init=init, impl=self.conv_impl, dtype=dtype,
                    name='conv1')(x)
    x = layers.make_norm(self.norm, train, 'bn1', dtype=dtype,
                         momentum=self.bn_momentum)(x)
    x = layers.Activation(self.activation, name='act1')(x)
    if stem[1] == 2:  # The ImageNet stem's 3x3/2 max-pool.
      x = layers.max_pool(x, 3, 2, padding=1)
    expansion = 4 if kind == 'bottleneck' else 1
    for s, (num_blocks, ch) in enumerate(zip(counts, (64, 128, 256, 512)), 1):
      for b in range(1, num_blocks + 1):
        stride = 2 if (b == 1 and s > 1) else 1
        x = Block(w(ch) * expansion if kind == 'bottleneck' else w(ch),
                  stride, kind == 'bottleneck', self.residual, self.shortcut,
                  self.norm, self.activation, init, self.bottleneck_stride,
                  self.conv_impl, dtype, self.bn_momentum,
                  name=f'stage{s}_block{b}')(
                      x, train=train)
    x = layers.global_avg_pool(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name='fc')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.


class CifarResNet(nn.Module):
  """CIFAR-10 ResNet of depth 6n+2 (Sec. 4.2)."""
  depth: int = 20
  num_classes: int = 10
  residual: bool = True
  shortcut: str = 'A'
  norm: str = 'batch'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  activation: str = 'relu'
  kernel_init: str = 'he_normal'
  init_std: float = 0.01  # Only for kernel_init='normal'.
  width: float = 1.0
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  knob_choices = {'shortcut': ('A', 'B', 'C')}

  def check_knobs(self):
    if (not isinstance(self.depth, int) or isinstance(self.depth, bool)
        or self.depth < 8 or (self.depth - 2) % 6):
      raise ConfigError(
          f'model.depth={self.depth!r} is not allowed for a CIFAR ResNet; it '
          f'must be 6n+2 with n >= 1, e.g. {", ".join(map(str, CIFAR_DEPTHS))}')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 8, f'resnet{self.depth}', 'two stride-2 '
                            'stages')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    w = lambda c: layers.scale_width(c, self.width)
    x = layers.Conv(w(16), (3, 3), padding=1, use_bias=self.norm == 'none',
                    kernel_init=init, impl=self.conv_impl, dtype=dtype,
                    name='conv1')(x)
    x = layers.make_norm(self.norm, train, 'bn1', dtype=dtype,
                         momentum=self.bn_momentum)(x)
    x = layers.Activation(self.activation, name='act1')(x)
    n = (self.depth - 2) // 6
    for s, ch in enumerate((16, 32, 64), 1):
      for b in range(1, n + 1):
        stride = 2 if (b == 1 and s > 1) else 1
        x = Block(w(ch), stride, False, self.residual, self.shortcut,
                  self.norm, self.activation, init, conv_impl=self.conv_impl,
                  dtype=dtype, bn_momentum=self.bn_momentum,
                  name=f'stage{s}_block{b}')(x, train=train)
    x = layers.global_avg_pool(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name='fc')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.
