"""cnn_lab.layers.conv2d against jax.lax.conv_general_dilated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_lab import layers

CASES = [
    # (batch, h, w, c_in, c_out, kernel, strides, padding)
    (2, 2, 2, 8, 16, 3, 1, 'SAME'),     # the tiny-map case the layer avoids
    (2, 1, 1, 8, 4, 3, 1, 'SAME'),
    (3, 5, 7, 4, 6, 3, 1, 'SAME'),
    (2, 8, 8, 3, 5, 3, 2, 'SAME'),
    (2, 9, 9, 4, 4, 5, 1, 'SAME'),
    (2, 7, 6, 3, 4, 3, 1, 'VALID'),
    (2, 6, 6, 2, 3, 3, 1, ((1, 1), (1, 1))),
    (2, 11, 11, 3, 8, 11, 4, ((2, 2), (2, 2))),  # AlexNet-style stem
    (2, 4, 4, 6, 5, 1, 1, 'SAME'),
]


def reference(x, kernel, strides, padding):
  if not isinstance(padding, str):
    padding = [tuple(p) for p in padding]
  return lax.conv_general_dilated(
      x, kernel, (strides, strides), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize('impl', ['shifted', 'im2col', 'xla', 'auto'])
@pytest.mark.parametrize('case', CASES, ids=str)
def test_conv2d_matches_lax_outputs_and_gradients(case, impl):
  n, h, w, ci, co, k, s, padding = case
  kx, kk, kg = jax.random.split(jax.random.key(hash(case) % 2**31), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  kernel = jax.random.normal(kk, (k, k, ci, co)) / np.sqrt(k * k * ci)
  ref = reference(x, kernel, s, padding)
  probe = jax.random.normal(kg, ref.shape)

  # Output, and gradients of a random linear functional of the output with
  # respect to both the input and the kernel; one compilation each.
  @jax.jit
  def ours(a, b):
    out, vjp = jax.vjp(lambda a, b: layers.conv2d(a, b, (s, s), padding,
                                                  impl), a, b)
    return out, vjp(probe)

  @jax.jit
  def theirs(a, b):
    return jax.vjp(lambda a, b: reference(a, b, s, padding), a, b)[1](probe)

  out, grad = ours(x, kernel)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)
  for g, r in zip(grad, theirs(x, kernel)):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=5e-4)


def test_auto_avoids_xla_on_tiny_maps_on_cpu():
  # Which path 'auto' takes is visible in the jaxpr: XLA's path has a
  # conv_general_dilated primitive, the matmul paths have none.
  def primitives(x_shape, ci):
    x = jnp.zeros(x_shape[:3] + (ci,))
    kernel = jnp.zeros((3, 3, ci, 8))
    jaxpr = jax.make_jaxpr(lambda a, b: layers.conv2d(a, b))(x, kernel)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}

  assert 'conv_general_dilated' not in primitives((2, 2, 2), 256)
  assert 'conv_general_dilated' in primitives((2, 16, 16), 256)
  assert 'conv_general_dilated' not in primitives((2, 16, 16), 64)


def test_conv_module_has_flax_conv_variables():
  import flax.linen as nn
  x = jnp.ones((1, 8, 8, 3))
  ours = layers.Conv(5, (3, 3)).init(jax.random.key(0), x)
  theirs = nn.Conv(5, (3, 3)).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
  # Same variables give the same function.
  np.testing.assert_allclose(layers.Conv(5, (3, 3)).apply(theirs, x),
                             nn.Conv(5, (3, 3)).apply(theirs, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,window,stride', [
    ((2, 8, 8, 3), 2, 2), ((2, 7, 7, 3), 2, 2), ((2, 9, 9, 2), 3, 2)])
def test_max_pool_matches_flax(shape, window, stride):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.max_pool(x, (window, window), (stride, stride))
  np.testing.assert_array_equal(layers.max_pool(x, window, stride), ref)
  # Without ties, the gradient goes to each window's maximum in both.
  probe = jax.random.normal(jax.random.key(1), ref.shape)
  g = jax.grad(lambda a: jnp.sum(layers.max_pool(a, window, stride) * probe))
  g_ref = jax.grad(lambda a: jnp.sum(
      nn.max_pool(a, (window, window), (stride, stride)) * probe))
  np.testing.assert_allclose(g(x), g_ref(x), rtol=1e-6)


def _pool_reference(x, window, stride, op, ceil, pad=0):
  """Pooling by loops over output cells, PyTorch's rules: explicit padding
  cells are -inf (max) or zeros counted in the average; ceil mode adds a last
  window that may hang over the edge, averaged over what it covers."""
  n, h, w, c = x.shape

  def out_size(size):
    span = size + 2 * pad - window
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
      out -= 1
    return out

  oh, ow = out_size(h), out_size(w)
  fill = -np.inf if op == 'max' else 0.0
  xp = np.full((n, h + 2 * pad + window, w + 2 * pad + window, c), np.nan)
  xp[:, :h + 2 * pad, :w + 2 * pad] = fill
  xp[:, pad:pad + h, pad:pad + w] = x
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      cell = xp[:, i * stride:i * stride + window, j * stride:j * stride +
                window].reshape(n, -1, c)
      if op == 'max':
        out[:, i, j] = np.nanmax(cell, axis=1)
      else:  # NaN marks cells beyond the padded map (ceil mode).
        out[:, i, j] = np.nanmean(cell, axis=1)
  return out


POOL_CASES = [
    (112, 3, 2, 'CEIL'),  # GoogLeNet's stem pool: 112 -> 56
    (14, 2, 2, 'CEIL'),   # its pool before stage 5: 14 -> 7
    (32, 3, 2, 'CEIL'),   # NiN's CIFAR pools: 32 -> 16
    (13, 3, 2, 'CEIL'),
    (28, 3, 1, 1),        # inception's pooling branch keeps the size
    (56, 3, 2, 1),        # ResNet's stem pool
]


@pytest.mark.parametrize('op,size,window,stride,padding', [
    ('max', *case) for case in POOL_CASES] + [
    ('avg', *case) for case in POOL_CASES if case[-1] == 'CEIL'])
def test_pools_match_pytorch_rules(op, size, window, stride, padding):
  expected_size = {(112, 'CEIL'): 56, (14, 'CEIL'): 7, (32, 'CEIL'): 16,
                   (13, 'CEIL'): 6, (28, 1): 28, (56, 1): 28}
  x = np.asarray(jax.random.normal(jax.random.key(size), (2, size, size, 3)))
  ceil = padding == 'CEIL'
  pad = 0 if ceil else padding
  ref = _pool_reference(x, window, stride, op, ceil, pad)
  fn = layers.max_pool if op == 'max' else layers.avg_pool
  out = fn(jnp.asarray(x), window, stride, padding)
  assert out.shape[1:3] == (expected_size[size, padding],) * 2
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('size,expected', [(54, 27), (27, 13), (13, 6),
                                           (16, 8), (7, 3), (2, 1)])
def test_ceil_mode_sizes(size, expected):
  # PyTorch's ceil_mode for a 3x3/2 pool: ceil((n - 3) / 2) + 1, less one
  # if the last window would start beyond the map (NiN: 54 -> 27 -> 13 -> 6).
  x = jnp.zeros((1, size, size, 1))
  assert layers.max_pool(x, 3, 2, 'CEIL').shape[1] == expected
  assert layers.avg_pool(x, 3, 2, 'CEIL').shape[1] == expected


@pytest.mark.parametrize('size,extra,out', [
    (14, 1, 4), (7, 1, 4), (13, 1, 6), (8, 1, 4),  # uneven cells
    (12, 0, 6), (16, 0, 4)])                        # the reshape path
def test_adaptive_avg_pool_cells(size, extra, out):
  x = np.asarray(jax.random.normal(jax.random.key(0),
                                   (2, size, size + extra, 3)))
  ref = np.zeros((2, out, out, 3))
  for i in range(out):
    for j in range(out):
      r0, r1 = int(np.floor(i * size / out)), int(np.ceil((i + 1) * size / out))
      c0, c1 = (int(np.floor(j * (size + extra) / out)),
                int(np.ceil((j + 1) * (size + extra) / out)))
      ref[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out),
                             ref, rtol=1e-5, atol=1e-6)


def test_local_response_norm_by_hand():
  # One pixel, 7 channels: each channel is divided by
  # (2 + 1e-4 * sum of squares of the channels within 2 of it)^0.75.
  a = np.arange(1.0, 8.0) * 10
  expected = [a[i] / (2 + 1e-4 * np.sum(a[max(0, i - 2):i + 3] ** 2)) ** 0.75
              for i in range(7)]
  out = layers.local_response_norm(jnp.asarray(a).reshape(1, 1, 1, 7))
  np.testing.assert_allclose(out.ravel(), expected, rtol=1e-5)


@pytest.mark.parametrize('channels,width,expected', [
    (64, 1.0, 64), (64, 0.25, 16), (6, 0.1, 1), (16, 0.125, 2), (10, 1.5, 15)])
def test_scale_width(channels, width, expected):
  assert layers.scale_width(channels, width) == expected
