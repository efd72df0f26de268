"""LeNet-5: LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied
to Document Recognition" (Proc. IEEE 1998), Sec. II.B and Fig. 2.

C1: 6 5x5 convolutions, S2: 2x2 subsampling, C3: 16 5x5 convolutions, S4:
2x2 subsampling, C5: 120 units, F6: 84 units, output: one unit per class.
The paper feeds 32x32 images (MNIST digits padded by 2 pixels); for 28x28
inputs the first convolution pads by 2 instead, so both give the same
5x5x16 map before C5 and the same 61,706 parameters for 10 classes.

Two forms, as knobs of one module:
- classic (the default, as in the paper): `activation='tanh'` and
  `pool='avg'` (its subsampling layers average 2x2 blocks);
- modern: `activation='relu'`, `pool='max'`.
Departures from the paper, the usual ones: plain tanh rather than the
paper's scaled 1.7159 tanh(2a/3); C3 connects to all six S2 maps (the
paper's Table I connects each C3 map to a subset); the subsampling layers
have no trainable coefficient and bias and no squashing of their own; the
output is a dense layer trained with softmax cross-entropy rather than
Euclidean RBF units. The paper draws weights from U(-2.4/F, 2.4/F) (F the
fan-in); the default `kernel_init='lecun_uniform'` is the same fan-in rule
with a wider bound, U(-sqrt(3/F), sqrt(3/F)), which keeps unit variance.
`dropout_rate` (0 by default, as in the paper) drops units after the
activations of C5 (fc1) and F6 (fc2); `bn_momentum` is the weight of the old
value in batch norm's moving averages. `norm='batch'` puts batch norm
between each convolution or hidden dense layer and its activation (not in
the paper). Inputs of 64x64 and more keep the
same layers; the map before C5 is then larger and C5 has more inputs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_lab import layers


class LeNet5(nn.Module):
  num_classes: int = 10
  activation: str = 'tanh'
  pool: str = 'avg'  # 'avg' (classic) or 'max' (modern).
  norm: str = 'none'
  bn_momentum: float = 0.9  # Old value's weight in BN's moving averages.
  kernel_init: str = 'lecun_uniform'
  init_std: float = 0.01  # Only for kernel_init='normal'.
  width: float = 1.0
  dropout_rate: float = 0.0  # After fc1 and fc2 (the paper has none).
  conv_impl: str = 'auto'
  dtype: str = 'float32'  # Compute dtype; parameters stay float32.

  knob_choices = {'pool': ('avg', 'max')}

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    layers.check_input_size(x, 28, 'lenet5', 'two 5x5 convolutions and two '
                            '2x2 poolings')
    init = layers.get_kernel_init(self.kernel_init, self.init_std)
    dtype = layers.get_dtype(self.dtype)
    x = x.astype(dtype)
    pool = layers.max_pool if self.pool == 'max' else layers.avg_pool
    # The paper's 32x32 input needs no padding; pad 28x28 inputs to match.
    first_pad = 2 if min(x.shape[1:3]) < 32 else 0
    for i, (ch, pad) in enumerate(((6, first_pad), (16, 0)), 1):
      x = layers.Conv(layers.scale_width(ch, self.width), (5, 5),
                      padding=pad, kernel_init=init, impl=self.conv_impl,
                      dtype=dtype, name=f'conv{i}')(x)
      x = layers.make_norm(self.norm, train, f'bn{i}', dtype=dtype,
                           momentum=self.bn_momentum)(x)
      x = pool(layers.Activation(self.activation, name=f'act{i}')(x), 2)
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate((120, 84), 1):
      x = nn.Dense(layers.scale_width(features, self.width), kernel_init=init,
                   dtype=dtype, name=f'fc{i}')(x)
      x = layers.make_norm(self.norm, train, f'fc_bn{i}', dtype=dtype,
                           momentum=self.bn_momentum)(x)
      x = layers.Activation(self.activation, name=f'fc{i}_act')(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=dtype,
                 name='fc3')(x)
    return x.astype(jnp.float32)  # Logits (and the loss) in float32.
