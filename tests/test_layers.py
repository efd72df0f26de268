"""cnn_lab.layers: the blocks against flax's own and against values
computed by hand (pooling by loops with PyTorch's rules, LRN, batch norm)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import layers


def test_conv_module_has_flax_conv_variables():
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


def _bn_case(shape, dtype):
  """Inputs with a large mean, one constant channel (variance 0, clipped
  at 0 in flax), and parameters and moving averages away from their
  initial values."""
  c = shape[-1]
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 3
  x = x.at[..., 0].set(1.5).astype(dtype)
  g = jax.random.normal(jax.random.key(1), shape).astype(jnp.float32)
  variables = {'params': {'scale': jnp.linspace(0.5, 1.5, c),
                          'bias': jnp.linspace(-1.0, 1.0, c)},
               'batch_stats': {'mean': jnp.full((c,), 0.3),
                               'var': jnp.full((c,), 2.0)}}
  return x, g, variables


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape', [(6, 5, 4, 3), (7, 5)])
def test_batch_norm_matches_flax(shape, dtype):
  x, g, variables = _bn_case(shape, dtype)
  settings = dict(momentum=0.9, epsilon=1e-5, dtype=dtype,
                  param_dtype=jnp.float32)

  def train_grads(module):
    def loss(params, x):
      y, new = module.apply({**variables, 'params': params}, x,
                            mutable=['batch_stats'])
      return jnp.sum(jax.nn.relu(y).astype(jnp.float32) * g), (y, new)
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        variables['params'], x)

  ours = layers.BatchNorm(use_running_average=False, **settings)
  theirs = nn.BatchNorm(use_running_average=False, **settings)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) ==
          jax.tree.map(jnp.shape, theirs.init(jax.random.key(2), x)))
  (d_params, dx), (y, new) = train_grads(ours)
  (ref_params, ref_dx), (ref_y, ref_new) = train_grads(theirs)
  # The forward pass and the moving averages are flax's, to the bit.
  assert y.dtype == ref_y.dtype == dtype and dx.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(ref_y, np.float32))
  jax.tree.map(np.testing.assert_array_equal, new, ref_new)
  evaluated = [m.clone(use_running_average=True).apply(variables, x)
               for m in (ours, theirs)]
  np.testing.assert_array_equal(np.asarray(evaluated[0], np.float32),
                                np.asarray(evaluated[1], np.float32))
  # The gradients agree to rounding: a float32 ulp or two of the largest
  # entry, one bfloat16 ulp for dx in bfloat16.
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in [(dx, ref_dx), *zip(jax.tree.leaves(d_params),
                                  jax.tree.leaves(ref_params))]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), (a, b)


def test_batch_norm_refuses_what_it_does_not_implement():
  x = jnp.ones((2, 3))
  with pytest.raises(NotImplementedError, match='last axis'):
    layers.BatchNorm(use_running_average=False, axis=0).init(
        jax.random.key(0), x)
