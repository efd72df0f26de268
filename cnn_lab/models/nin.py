"""Network in Network: Lin, Chen & Yan, "Network In Network" (ICLR 2014).

Each mlpconv block is a kxk convolution followed by two 1x1 convolutions
(a small multilayer perceptron slid over the image, Sec. 3.1), each with its
activation; the classifier is the last mlpconv block producing one map per
class, averaged over the image (global average pooling, Sec. 3.2), with no
fully connected layer.

Small inputs (below 64x64, e.g. 28 or 32): the paper's CIFAR-10 network
(Sec. 4.2, and the authors' released Caffe definition): mlpconv 192(5x5)-
160-96, 3x3/2 max-pool, dropout; mlpconv 192(5x5)-192-192, 3x3/2 average
pool, dropout; mlpconv 192(3x3)-192-classes, global average pool. At 32x32x3
and 10 classes it has 966,986 parameters. Pools use Caffe's ceil mode, as
the authors' code does (32 -> 16 -> 8; 224 -> 54 -> 27 -> 13 -> 6).

64x64 and up: the ImageNet NiN of the Caffe model zoo (D2L's NiN is a
smaller variant of it): mlpconv 96(11x11/4)-96-96, 256(5x5)-256-256,
384(3x3)-384-384, each followed by a 3x3/2 max-pool, dropout, then
mlpconv 1024(3x3)-1024-classes and global average pooling.

Knobs: `dropout_rate` (0.5, the paper's), `activation`, `norm='batch'`
(after every convolution, before its activation; not in the paper),
`kernel_init`, `width` (all channels but the class maps). The class maps get
the activation too, as in the paper's code (a ReLU before the average pool).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers

# (kernel, stride, padding, channels of the three convolutions, pool after).
CIFAR_BLOCKS = (
    (5, 1, 2, (192, 160, 96), 'max'),
    (5, 1, 2, (192, 192, 192), 'avg'),
    (3, 1, 1, (192, 192, None), None),  # None: num_classes.
)
IMAGENET_BLOCKS = (
    (11, 4, 0, (96, 96, 96), 'max'),
    (5, 1, 2, (256, 256, 256), 'max'),
    (3, 1, 1, (384, 384, 384), 'max'),
    (3, 1, 1, (1024, 1024, None), None),
)


class NiN(nn.Module):
  num_classes: int = 10
  dropout_rate: float = 0.5
  activation: str = 'relu'
  norm: str = 'none'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  kernel_init: str = 'he_normal'  # The paper does not state one.
  init_std: float = 0.01  # Only for kernel_init='normal'.
  width: float = 1.0
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 28, 'nin', 'two or three 3x3/2 pools')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    small = layers.is_small_input(x)
    blocks = CIFAR_BLOCKS if small else IMAGENET_BLOCKS
    for b, (k, stride, pad, channels, pool) in enumerate(blocks, 1):
      for i, ch in enumerate(channels, 1):
        ch = self.num_classes if ch is None else layers.scale_width(
            ch, self.width)
        conv_k = (k, k) if i == 1 else (1, 1)
        x = layers.Conv(ch, conv_k, strides=(stride, stride) if i == 1 else
                        (1, 1), padding=pad if i == 1 else 0,
                        kernel_init=init, impl=self.conv_impl, dtype=dtype,
                        name=f'mlpconv{b}_conv{i}')(x)
        x = layers.make_norm(self.norm, train, f'mlpconv{b}_bn{i}',
                             dtype=dtype, momentum=self.bn_momentum)(x)
        x = layers.Activation(self.activation, name=f'mlpconv{b}_act{i}')(x)
      if pool == 'max':
        x = layers.max_pool(x, 3, 2, padding='CEIL')
      elif pool == 'avg':
        x = layers.avg_pool(x, 3, 2, padding='CEIL')
      # Dropout after every block but the classifier (the paper's Sec. 4.2;
      # the ImageNet variant drops only before the classifier block).
      if pool and (small or b == len(blocks) - 1):
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Logits (and the loss) in float32.
    return layers.global_avg_pool(x).astype(jnp.float32)
