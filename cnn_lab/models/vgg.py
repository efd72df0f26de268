"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition" (ICLR 2015), Table 1, configurations A, B, D, E
(VGG11/13/16/19).

Five stages of 3x3 convolutions (stride 1, padding 1) with 64, 128, 256, 512,
512 channels, each stage closed by a 2x2 max-pool, then three fully connected
layers. At 224x224 input the head is the paper's 4096-4096 classifier with
dropout 0.5 after the first two FC layers; its parameter count equals
torchvision's `vgg*` models (whose adaptive 7x7 pooling is the identity at
224x224). Small inputs (32x32 up to 63x63, e.g. CIFAR or Fashion-MNIST padded
to 32) end the features at 1x1x512 and use a 512-512 head, the usual CIFAR
variant; set `head_features` to choose another.

Knobs (defaults follow the paper): `norm='batch'` adds batch norm between
each convolution and its activation (the later `vgg*_bn` variant, not in the
paper); `kernel_init` defaults to Glorot uniform, the initialisation the paper
reports (Sec. 3.1) trains the deep configurations without pre-training;
`width` multiplies every channel count and hidden feature (cheap CPU runs);
`dropout_rate` is that of the two hidden fully connected layers.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers

STAGE_CHANNELS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
  """VGG network; `stages` gives the number of 3x3 convolutions per stage."""
  stages: Sequence[int]
  num_classes: int = 1000
  norm: str = 'none'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  activation: str = 'relu'
  dropout_rate: float = 0.5
  kernel_init: str = 'glorot_uniform'
  init_std: float = 0.01  # Only for kernel_init='normal'.
  head_features: Sequence[int] | None = None  # None: by input size (above).
  width: float = 1.0  # Multiplies every channel count and hidden feature.
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 32, 'VGG', 'five 2x2 max-pools; set '
                            'data.image_size to 32 or more')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    for s, (num_convs, ch) in enumerate(zip(self.stages, STAGE_CHANNELS), 1):
      for i in range(1, num_convs + 1):
        x = layers.Conv(layers.scale_width(ch, self.width), (3, 3),
                        padding=1, kernel_init=init,
                        impl=self.conv_impl, dtype=dtype,
                        name=f'block{s}_conv{i}')(x)
        x = layers.make_norm(self.norm, train, f'block{s}_bn{i}',
                             dtype=dtype, momentum=self.bn_momentum)(x)
        x = layers.Activation(self.activation, name=f'block{s}_act{i}')(x)
      x = layers.max_pool(x, 2)

    head = self.head_features
    if head is None:
      head = (4096, 4096) if min(x.shape[1:3]) >= 7 else (512, 512)
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(head, 1):
      x = nn.Dense(layers.scale_width(features, self.width),
                   kernel_init=init, dtype=dtype, name=f'fc{i}')(x)
      x = layers.Activation(self.activation, name=f'fc{i}_act')(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name=f'fc{len(head) + 1}')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.


VGG11 = functools.partial(VGG, stages=(1, 1, 2, 2, 2))  # Configuration A.
VGG13 = functools.partial(VGG, stages=(2, 2, 2, 2, 2))  # Configuration B.
VGG16 = functools.partial(VGG, stages=(2, 2, 3, 3, 3))  # Configuration D.
VGG19 = functools.partial(VGG, stages=(2, 2, 4, 4, 4))  # Configuration E.
