"""XLA's own convolution, the path of every accelerator and of CPU layers
that no other path beats."""

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab.kernels.geometry import explicit_padding

Array = jax.Array


def conv_xla(x: Array, kernel: Array, strides: Sequence[int],
             padding) -> Array:
  pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  return lax.conv_general_dilated(
      x, kernel, tuple(strides), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def kernel_grad_xla(x, dy, kernel_shape, strides, pads):
  kernel = jnp.zeros(kernel_shape, x.dtype)
  return jax.vjp(lambda k: conv_xla(x, k, strides, pads), kernel)[1](dy)[0]
