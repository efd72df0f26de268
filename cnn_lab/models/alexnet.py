"""AlexNet: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with
Deep Convolutional Neural Networks" (NeurIPS 2012), in the single-tower
layout of torchvision's `alexnet` (Krizhevsky, "One weird trick for
parallelizing convolutional neural networks", 2014): convolutions of 64
11x11/4, 192 5x5, 384, 256 and 256 3x3 channels, 3x3/2 max-pools after the
first, second and fifth, then 4096-4096-classes fully connected layers with
dropout 0.5 before each of the first two. At 224x224x3 and 1000 classes it
has torchvision's 61,100,840 parameters.

Knobs: `activation` (ReLU is the change the paper is known for, Sec. 3.1 and
Fig. 1; 'tanh' or 'sigmoid' is the saturating alternative), `dropout_rate`,
`lrn` (the 2012 paper's local response normalisation after the first two
convolutions, k=2, n=5, alpha=1e-4, beta=0.75; off by default as in the
single-tower layout, and it has no parameters), `norm='batch'` (batch norm
between each convolution and its activation; not in the paper),
`kernel_init` (default: the paper's N(0, 0.01^2); `he_normal` trains more
reliably from scratch without its hand-tuned learning rate).

Small inputs (below 64x64, e.g. 28 or 32): the first convolution becomes
5x5 with stride 1 and padding 2 (as in the CIFAR-10 networks of the same
paper's lineage), the pools stay 3x3/2, and the head flattens the final
(2x2 or 3x3) map. At 224x224 torchvision's adaptive 6x6 average pool is the
identity; at 64x64 the 1x1 final map is flattened as it is.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers

CONV_CHANNELS = (64, 192, 384, 256, 256)


class AlexNet(nn.Module):
  num_classes: int = 1000
  activation: str = 'relu'
  dropout_rate: float = 0.5
  lrn: bool = False
  norm: str = 'none'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  kernel_init: str = 'normal'
  init_std: float = 0.01  # The paper's N(0, 0.01^2).
  width: float = 1.0
  head_features: Sequence[int] = (4096, 4096)
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 28, 'alexnet', 'three 3x3/2 max-pools')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    if layers.is_small_input(x):
      stem = dict(kernel_size=(5, 5), strides=(1, 1), padding=2)
    else:
      stem = dict(kernel_size=(11, 11), strides=(4, 4), padding=2)
    specs = [stem, dict(kernel_size=(5, 5), padding=2)] + [
        dict(kernel_size=(3, 3), padding=1)] * 3
    for i, (ch, spec) in enumerate(zip(CONV_CHANNELS, specs), 1):
      x = layers.Conv(layers.scale_width(ch, self.width), kernel_init=init,
                      impl=self.conv_impl, dtype=dtype, name=f'conv{i}',
                      **spec)(x)
      x = layers.make_norm(self.norm, train, f'bn{i}', dtype=dtype,
                           momentum=self.bn_momentum)(x)
      x = layers.Activation(self.activation, name=f'act{i}')(x)
      if self.lrn and i <= 2:
        x = layers.local_response_norm(x)
      if i in (1, 2, 5):
        x = layers.max_pool(x, 3, 2)
    if min(x.shape[1:3]) >= 6:
      x = layers.adaptive_avg_pool(x, 6)  # torchvision's AdaptiveAvgPool2d.
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(self.head_features, 1):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(layers.scale_width(features, self.width), kernel_init=init,
                   dtype=dtype, name=f'fc{i}')(x)
      x = layers.Activation(self.activation, name=f'fc{i}_act')(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name=f'fc{len(self.head_features) + 1}')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.
