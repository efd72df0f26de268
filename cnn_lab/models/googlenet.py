"""GoogLeNet (Inception v1): Szegedy et al., "Going Deeper with Convolutions"
(CVPR 2015), Table 1 and Fig. 2-3.

Nine inception modules, each concatenating four branches: a 1x1
convolution; a 1x1 reduction then a 3x3 convolution; a 1x1 reduction then a
5x5 convolution; a 3x3/1 max-pool then a 1x1 projection. Channel counts are
Table 1's. The head is global average pooling, dropout and one linear layer.

Which reference the default follows. The issue's yardstick is torchvision's
`googlenet` (6,624,904 parameters at 224x224x3, 1000 classes, without the
auxiliary heads), and torchvision departs from the paper in four ways:
batch norm after every convolution (whose bias it drops; eps 1e-3), a 3x3
kernel in the "5x5" branch (a bug kept for its pretrained weights), a 2x2/2
max-pool before stage 5 (the paper's is 3x3/2; the output shape is the same),
dropout 0.2 (the paper's is 0.4), and an adaptive 4x4 average pool in the
auxiliary heads (the paper's is 5x5/3, the same 4x4 output at 14x14 from
different windows); it also drops the two local response normalisations of
the stem. The default `googlenet` follows torchvision so that its layer
shapes and parameter count are those of the implementation people compare
against, including its initialisation (N(0, 0.01^2); its bounds of +-2 cut
nothing at that std). `googlenet_paper` sets every knob to the paper:
`norm='none'`, `branch5='5x5'`, `pool4=3`, `aux_pool='paper'`,
`dropout_rate=0.4`, `lrn=True`, `aux_heads=True`; the paper gives no
initialisation, so it takes that of the BVLC Caffe reproduction (Caffe's
"xavier" filler, U(+-sqrt(3/fan_in)), i.e. `lecun_uniform`).

Knobs: `reduction=False` removes the 1x1 reductions before the 3x3 and 5x5
branches (the "naive" module of Fig. 2a, with the pooling projection kept so
that every module still outputs the same channels) to show what they save;
`branch5='3x3x2'` replaces the 5x5 convolution by two stacked 3x3 ones
(BN-Inception, Ioffe & Szegedy 2015); `aux_heads=True` adds the two
auxiliary classifiers after inception4a and 4d (5x5/3 average pool, 1x1
convolution of 128, FC 1024, dropout 0.7, linear), used in training only,
their loss added with weight `train.aux_loss_weight` (0.3); `head='fc'`
flattens the last map into a fully connected classifier instead of global
average pooling (Sec. 5 reports the pooling head 0.6% better in top-1);
`norm='batch'` / `'none'`.

Small inputs (below 64x64): the stem keeps its three convolutions (3x3/1,
1x1, 3x3/1; `lrn` still follows the first and third) but drops the stride
and both pools, so inception3 runs at the input resolution (32 -> 16 -> 8
through stages 3-5, as in the usual CIFAR GoogLeNet). The auxiliary heads'
paper pool (5x5/3) needs a map of at least 5x5; on smaller ones (64x64
input) they pool adaptively to 4x4 as torchvision does.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection), Table 1.
INCEPTION = {
    '3a': (64, 96, 128, 16, 32, 32),
    '3b': (128, 128, 192, 32, 96, 64),
    '4a': (192, 96, 208, 16, 48, 64),
    '4b': (160, 112, 224, 24, 64, 64),
    '4c': (128, 128, 256, 24, 64, 64),
    '4d': (112, 144, 288, 32, 64, 64),
    '4e': (256, 160, 320, 32, 128, 128),
    '5a': (256, 160, 320, 32, 128, 128),
    '5b': (384, 192, 384, 48, 128, 128),
}
BN_EPSILON = 1e-3  # torchvision's BasicConv2d.


class ConvNormAct(nn.Module):
  """Convolution, optional batch norm, activation (torchvision's
  BasicConv2d); the convolution has a bias only without batch norm."""
  features: int
  kernel: int
  stride: int = 1
  norm: str = 'none'
  activation: str = 'relu'
  kernel_init: Callable = nn.initializers.lecun_normal()
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.Conv(self.features, (self.kernel, self.kernel),
                    strides=(self.stride, self.stride),
                    padding=self.kernel // 2, use_bias=self.norm == 'none',
                    kernel_init=self.kernel_init, impl=self.conv_impl,
                    dtype=self.dtype, name='conv')(x)
    x = layers.make_norm(self.norm, train, 'bn', epsilon=BN_EPSILON,
                         dtype=self.dtype, momentum=self.bn_momentum)(x)
    return layers.Activation(self.activation, name='act')(x)


class Inception(nn.Module):
  channels: tuple  # As in INCEPTION, already scaled by the width.
  reduction: bool = True
  branch5: str = '3x3'
  conv: Callable = ConvNormAct

  @nn.compact
  def __call__(self, x, *, train: bool):
    c1, c3r, c3, c5r, c5, cp = self.channels
    b1 = self.conv(c1, 1, name='branch1')(x, train=train)
    b2 = x
    if self.reduction:
      b2 = self.conv(c3r, 1, name='branch2_reduce')(b2, train=train)
    b2 = self.conv(c3, 3, name='branch2')(b2, train=train)
    b3 = x
    if self.reduction:
      b3 = self.conv(c5r, 1, name='branch3_reduce')(b3, train=train)
    if self.branch5 == '3x3x2':
      b3 = self.conv(c5, 3, name='branch3_a')(b3, train=train)
      b3 = self.conv(c5, 3, name='branch3_b')(b3, train=train)
    else:
      b3 = self.conv(c5, 5 if self.branch5 == '5x5' else 3,
                     name='branch3')(b3, train=train)
    b4 = layers.max_pool(x, 3, 1, padding=1)
    b4 = self.conv(cp, 1, name='branch4_proj')(b4, train=train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHead(nn.Module):
  """Auxiliary classifier (Sec. 5): its logits are sown, not returned."""
  num_classes: int
  width: float
  conv: Callable
  activation: str
  kernel_init: Callable
  pool: str = 'adaptive'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.pool == 'paper' and min(x.shape[1:3]) >= 5:
      x = layers.avg_pool(x, 5, 3)  # 14x14 -> 4x4 (Sec. 5).
    else:
      x = layers.adaptive_avg_pool(x, 4)  # torchvision's.
    x = self.conv(layers.scale_width(128, self.width), 1, name='conv')(
        x, train=train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(layers.scale_width(1024, self.width),
                 kernel_init=self.kernel_init, dtype=self.dtype,
                 name='fc1')(x)
    x = layers.Activation(self.activation, name='fc1_act')(x)
    x = nn.Dropout(0.7, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, kernel_init=self.kernel_init,
                      dtype=self.dtype, name='fc2')(x)
    logits = logits.astype(jnp.float32)  # Their loss in float32 too.
    if train:  # The training loss adds these, weighted (train.py).
      self.sow('aux_logits', 'logits', logits)
    return logits


class GoogLeNet(nn.Module):
  num_classes: int = 1000
  reduction: bool = True
  branch5: str = '3x3'  # '5x5' (paper), '3x3' (torchvision), '3x3x2'.
  aux_heads: bool = False
  head: str = 'gap'  # 'gap' or 'fc'.
  norm: str = 'batch'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  activation: str = 'relu'
  dropout_rate: float = 0.2
  lrn: bool = False
  pool4: int = 2  # Window of the max-pool before stage 5 (paper: 3).
  aux_pool: str = 'adaptive'  # Auxiliary heads: 'adaptive' or 'paper'.
  kernel_init: str = 'normal'
  init_std: float = 0.01  # torchvision's N(0, 0.01^2).
  width: float = 1.0
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  knob_choices = {'branch5': ('5x5', '3x3', '3x3x2'), 'head': ('gap', 'fc'),
                  'pool4': (2, 3), 'aux_pool': ('adaptive', 'paper')}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 28, 'googlenet', 'two 2x downsamplings after '
                            'the stem')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    def conv(features, kernel, stride=1, name=None):
      return ConvNormAct(features, kernel, stride, self.norm, self.activation,
                         init, self.conv_impl, dtype, self.bn_momentum,
                         name=name)

    w = lambda c: layers.scale_width(c, self.width)
    small = layers.is_small_input(x)
    if small:
      x = conv(w(64), 3, name='conv1')(x, train=train)
    else:
      x = conv(w(64), 7, stride=2, name='conv1')(x, train=train)
      x = layers.max_pool(x, 3, 2, padding='CEIL')
    if self.lrn:
      x = layers.local_response_norm(x)
    x = conv(w(64), 1, name='conv2')(x, train=train)
    x = conv(w(192), 3, name='conv3')(x, train=train)
    if self.lrn:
      x = layers.local_response_norm(x)
    if not small:
      x = layers.max_pool(x, 3, 2, padding='CEIL')

    def inception(name, x):
      channels = tuple(w(c) for c in INCEPTION[name])
      return Inception(channels, self.reduction, self.branch5, conv,
                       name=f'inception{name}')(x, train=train)

    def aux(name, x):
      # Built at init so that the parameters exist; run in training only.
      if train or self.is_initializing():
        AuxHead(self.num_classes, self.width, conv, self.activation, init,
                self.aux_pool, dtype, name=name)(x, train=train)

    x = inception('3b', inception('3a', x))
    x = layers.max_pool(x, 3, 2, padding='CEIL')
    x = inception('4a', x)
    if self.aux_heads:
      aux('aux1', x)
    x = inception('4d', inception('4c', inception('4b', x)))
    if self.aux_heads:
      aux('aux2', x)
    x = inception('4e', x)
    x = layers.max_pool(x, self.pool4, 2, padding='CEIL')
    x = inception('5b', inception('5a', x))
    if self.head == 'gap':
      x = layers.global_avg_pool(x)
    else:
      x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name='fc')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.
