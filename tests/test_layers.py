"""cnn_lab.layers.conv2d against jax.lax.conv_general_dilated."""

import functools
import platform
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_lab import layers, onednn
from cnn_lab.errors import ConfigError

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


@pytest.mark.parametrize('impl', ['shifted', 'im2col', 'xla', 'auto',
                                  'fast'])
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


# (forward, dx, dw) for conv_paths: each path in each role once, and
# forward and dx paths that differ.
# Winograd's paths take only 3x3 kernels at stride 1 with padding 1: they
# have their own test below, on the cases of PATH_CASES that allow them.
PATHS = [('xla', 'im2col', 'shifted'), ('im2col', 'shifted', 'xla'),
         ('shifted', 'xla', 'matmul'), ('chunked', 'chunked', 'chunked')]
WINOGRAD_PATHS = [('winograd', 'winograd', 'winograd'),
                  ('winograd', 'xla', 'chunked'),
                  ('xla', 'winograd', 'winograd')]
assert ({p[0] for p in PATHS} == {p[1] for p in PATHS} ==
        set(layers.CONV_FNS) - {'winograd', 'onednn'})
assert {p[2] for p in PATHS} == set(layers.KERNEL_GRAD_FNS) - {'winograd',
                                                               'onednn'}

# (batch, h, w, c_in, c_out, kernel, strides, padding): strides 1 and 2,
# kernels 1, 3, 5 and 7, int, tuple, 'SAME' and 'VALID' padding, odd and
# non-square maps, maps of 1 and 2 pixels.
PATH_CASES = [
    (2, 5, 7, 3, 4, 3, 1, 1),
    (2, 9, 8, 4, 6, 3, 2, 'SAME'),
    (2, 7, 7, 4, 5, 1, 1, 'VALID'),
    (3, 9, 7, 4, 6, 1, 2, 'VALID'),        # ResNet's projection shortcut
    (2, 9, 9, 3, 4, 5, 1, 'VALID'),
    (2, 11, 10, 2, 3, 5, 2, ((2, 1), (0, 2))),
    (2, 13, 11, 3, 4, 7, 2, 3),            # ResNet's ImageNet stem
    (2, 2, 2, 6, 5, 3, 1, 'SAME'),         # VGG's last stage at 32x32
    (2, 1, 1, 4, 3, 3, 1, 'SAME'),
    (2, 9, 6, 5, 7, 3, 1, 'SAME'),         # Winograd: 3x2 tiles, cut.
    (1, 12, 8, 16, 12, 3, 1, ((1, 1), (1, 1))),  # Whole 4x4 tiles.
    (3, 10, 9, 1, 6, 5, 1, 2),             # LeNet-5's C1: one channel.
]
WINOGRAD_CASES = [
    case for case in PATH_CASES if layers.winograd_applies(
        (case[5],) * 2, (case[6],) * 2,
        layers.conv_geometry(case[1:3], (case[5],) * 2, (case[6],) * 2,
                             case[7])[0])]
assert len(WINOGRAD_CASES) == 5


def vjp_of(conv, x, kernel, probe):
  out, vjp = jax.vjp(conv, x, kernel)
  return (out, *vjp(probe))


@functools.cache
def path_case(case, dtype):
  """Inputs, kernel and output probe of `case` in `dtype`, and the
  reference output and gradients: lax.conv_general_dilated in float32
  (HIGHEST precision) on the same values."""
  n, h, w, ci, co, k, s, padding = case
  kx, kk, kg = jax.random.split(jax.random.key(PATH_CASES.index(case)), 3)
  x = jax.random.normal(kx, (n, h, w, ci)).astype(dtype)
  kernel = (jax.random.normal(kk, (k, k, ci, co)) /
            np.sqrt(k * k * ci)).astype(dtype)
  pads, out_hw = layers.conv_geometry((h, w), (k, k), (s, s), padding)
  probe = jax.random.normal(kg, (n, *out_hw, co)).astype(dtype)
  f32 = [np.asarray(a, np.float32) for a in (x, kernel, probe)]
  ref = jax.jit(vjp_of, static_argnums=0)(
      lambda a, b: reference(a, b, s, pads), *f32)
  return (x, kernel, probe), [np.asarray(r) for r in ref]


def run_conv_paths(case, paths, dtype):
  """(output, dx, dw) of `conv_paths` with `paths` on `case` in `dtype`,
  and the float32 reference on the same (rounded) values."""
  (x, kernel, probe), ref = path_case(case, dtype)
  s, pads = case[6], layers.conv_geometry(case[1:3], (case[5],) * 2,
                                          (case[6],) * 2, case[7])[0]
  conv = lambda a, b: layers.conv_paths(a, b, (s, s), pads, paths)
  # One image per chunk, so that the scans of the chunked forward pass and
  # kernel gradient run over the batch (2 or 3 images here).
  with mock.patch.object(layers, 'CHUNK_BYTES', 1):
    got = jax.jit(vjp_of, static_argnums=0)(conv, x, kernel, probe)
  return got, ref


@pytest.mark.parametrize('paths', PATHS, ids='/'.join)
@pytest.mark.parametrize('case', PATH_CASES, ids=str)
def test_conv_paths_float32_output_and_both_gradients(case, paths):
  assert_float32_close(*run_conv_paths(case, paths, jnp.float32), 1e-4)


def assert_float32_close(got, ref, atol_of_max):
  """(output, dx, dw) in float32, each within rtol 1e-4 and `atol_of_max`
  times the reference's largest magnitude."""
  for name, g, r in zip(('output', 'dx', 'dw'), got, ref):
    assert g.shape == r.shape and g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, r, rtol=1e-4,
                               atol=atol_of_max * np.abs(r).max(),
                               err_msg=name)


@pytest.mark.parametrize('paths', WINOGRAD_PATHS, ids='/'.join)
@pytest.mark.parametrize('case', WINOGRAD_CASES, ids=str)
def test_winograd_paths_float32(case, paths):
  # The transforms' constants (up to 8 and 1/24) cost F(4x4, 3x3) some
  # float32 accuracy; ~3e-6 of the largest value on these cases.
  assert_float32_close(*run_conv_paths(case, paths, jnp.float32), 3e-5)


def test_winograd_matrices_compute_a_correlation():
  # In float64, with the matrices alone: A^T [(G g) * (B^T d)] is the 1-D
  # valid correlation of a 6-tap input d with a 3-tap filter g, 4 outputs
  # (the 2-D transform applies the same matrices along both axes).
  rng = np.random.default_rng(0)
  for _ in range(20):
    d, g = rng.normal(size=6), rng.normal(size=3)
    got = layers.WINOGRAD_AT @ ((layers.WINOGRAD_G @ g) *
                                (layers.WINOGRAD_BT @ d))
    want = [d[i:i + 3] @ g for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('batch,hw,want', [
    (128, 28, 4),   # LeNet-5's C1: 18.8 KB out per image, 32 per MiB.
    (32, 28, 2),    # Would fit one MiB; two chunks of 16 instead.
    (6, 8, 2), (7, 8, 7), (1, 8, 1)])
def test_conv_chunked_loops_over_two_chunks_or_more(batch, hw, want):
  # XLA removes a loop of one iteration, and with it the boundary that
  # keeps the output from being fused into (and recomputed in) its
  # consumers: any batch of two or more images runs two chunks or more.
  jaxpr = jax.make_jaxpr(
      lambda x, k: layers.conv_chunked(x, k, (1, 1), 'SAME'))(
          jnp.zeros((batch, hw, hw, 1)), jnp.zeros((5, 5, 1, 6)))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert [e.params['length'] for e in scans] == [want]


@pytest.mark.parametrize('kernel,strides,padding', [
    (3, 2, 'SAME'), (3, 1, 'VALID'), (5, 1, 'SAME'), (1, 1, 'SAME')])
def test_conv_winograd_refuses_other_convolutions(kernel, strides, padding):
  x, k = jnp.zeros((1, 8, 8, 2)), jnp.zeros((kernel, kernel, 2, 2))
  assert not layers.winograd_applies(
      (kernel, kernel), (strides, strides),
      layers.conv_geometry((8, 8), (kernel,) * 2, (strides,) * 2,
                           padding)[0])
  with pytest.raises(ValueError, match='3x3 kernels at stride 1'):
    layers.conv_winograd(x, k, (strides, strides), padding)


@pytest.mark.parametrize('paths', PATHS, ids='/'.join)
@pytest.mark.parametrize('case', PATH_CASES[:3] + PATH_CASES[6:8], ids=str)
def test_conv_paths_bfloat16(case, paths):
  # Inputs rounded to bfloat16; the reference is float32 on the same
  # values. Each result rounds to bfloat16 (2^-9 relative), and the
  # shifted forward pass and the dx of the matmul paths also round their
  # per-tap terms before summing them: 2% of the largest value bounds
  # both (kernel gradients accumulate in float32).
  got, ref = run_conv_paths(case, paths, jnp.bfloat16)
  for name, g, r in zip(('output', 'dx', 'dw'), got, ref):
    assert g.shape == r.shape and g.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2,
                               atol=2e-2 * np.abs(r).max(), err_msg=name)


@pytest.mark.parametrize('case', PATH_CASES, ids=str)
def test_onednn_paths_float32(case):
  assert_float32_close(*run_conv_paths(case, layers.ONEDNN_PATHS,
                                       jnp.float32), 1e-4)


def test_onednn_is_built_where_setup_installs_it():
  # setup.sh installs oneDNN's wheels (Linux x86-64 only) and builds the
  # handlers; without them every layer would quietly keep slower paths.
  if sys.platform == 'linux' and platform.machine() == 'x86_64':
    assert onednn.available(), onednn._load()
    assert onednn.library_path().exists()


def test_onednn_impl_refuses_bfloat16_and_other_backends():
  x, kernel = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ConfigError, match='not bfloat16 on cpu'):
    layers.conv2d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                  impl='onednn')
  with mock.patch.object(jax, 'default_backend', lambda: 'gpu'):
    with pytest.raises(ConfigError, match='not float32 on gpu'):
      layers.conv2d(x, kernel, impl='onednn')


def test_onednn_build_names_a_missing_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-g++'))
  with pytest.raises(RuntimeError, match='no-such-g\\+\\+'):
    onednn.build()


def test_select_conv_paths_with_onednn():
  def select(ci, co, k=3, s=1, hw=32, dtype=jnp.float32, backend='cpu'):
    return layers.select_conv_paths(backend, (128, hw, hw, ci),
                                    (k, k, ci, co), (s, s), 'SAME', dtype,
                                    with_onednn=True)

  onednn_paths = ('onednn', 'onednn', 'onednn')
  # float32 layers with fewer than 128 channels on either side, any kernel.
  for shape in [(16, 16), (3, 16), (1, 6, 5), (6, 16, 5), (64, 64, 1),
                (16, 32, 3, 2), (3, 64, 7, 2), (127, 512), (512, 64)]:
    assert select(*shape) == onednn_paths, shape
  # Wider ones, bfloat16 and other backends: as without oneDNN.
  for kwargs in [dict(ci=128, co=128), dict(ci=256, co=512, hw=8),
                 dict(ci=128, co=256, k=1),
                 dict(ci=16, co=16, dtype=jnp.bfloat16),
                 dict(ci=16, co=16, backend='gpu')]:
    without = layers.select_conv_paths(
        kwargs.get('backend', 'cpu'), (128, kwargs.get('hw', 32),
                                       kwargs.get('hw', 32), kwargs['ci']),
        (kwargs.get('k', 3),) * 2 + (kwargs['ci'], kwargs['co']), (1, 1),
        'SAME', kwargs.get('dtype', jnp.float32))
    assert select(**kwargs) == without != onednn_paths, kwargs


def test_select_conv_paths_cpu_only():
  def select(backend, hw, ci, co, k, s=1, padding='SAME'):
    return layers.select_conv_paths(backend, (128, hw, hw, ci), (k, k, ci, co),
                                    (s, s), padding)

  xla = ('xla', 'xla', 'xla')
  shapes = [(2, 512, 512, 3), (32, 16, 16, 3), (16, 32, 64, 3, 2),
            (28, 1, 6, 5), (8, 64, 64, 1), (224, 3, 64, 7, 2)]
  for backend in ('gpu', 'tpu', 'cuda', 'rocm', 'METAL'):
    assert all(select(backend, *shape) == xla for shape in shapes)
  # CPU: tiny maps take im2col for all three products; 3x3 kernels on
  # larger maps Winograd's or per-tap matmuls for dw; 1x1 kernels matmuls
  # for all three; kernels of 5x5 and more keep XLA's paths, except for
  # thin inputs (below).
  assert select('cpu', 2, 512, 512, 3) == ('im2col', 'im2col', 'matmul')
  assert select('cpu', 3, 64, 64, 3, padding='VALID') == (
      'im2col', 'im2col', 'matmul')                       # A 1x1 output.
  # 3x3 'SAME' at stride 1 in float32: Winograd's dw from 32 input and
  # output channels on, and its forward and dx from 128 on.
  winograd = ('winograd', 'winograd', 'winograd')
  assert select('cpu', 4, 512, 512, 3) == winograd
  assert select('cpu', 16, 128, 128, 3) == winograd
  assert select('cpu', 8, 128, 256, 3) == winograd
  assert select('cpu', 16, 64, 128, 3) == ('xla', 'xla', 'winograd')
  assert select('cpu', 32, 64, 64, 3) == ('xla', 'xla', 'winograd')
  assert select('cpu', 16, 32, 32, 3) == ('xla', 'xla', 'winograd')
  assert select('cpu', 32, 16, 16, 3) == ('xla', 'xla', 'chunked')
  assert select('cpu', 32, 16, 64, 3) == ('xla', 'xla', 'chunked')
  # Other 3x3 layers, and bfloat16: dw over chunks of the batch.
  assert select('cpu', 32, 16, 32, 3, 2) == ('xla', 'xla', 'chunked')
  assert select('cpu', 32, 16, 16, 3, padding='VALID') == (
      'xla', 'xla', 'chunked')
  assert layers.select_conv_paths(
      'cpu', (128, 8, 8, 256), (3, 3, 256, 256), (1, 1), 'SAME',
      jnp.bfloat16) == ('xla', 'xla', 'chunked')
  assert select('cpu', 8, 64, 64, 1) == ('im2col', 'im2col', 'matmul')
  assert select('cpu', 8, 64, 64, 1, 2) == ('im2col', 'im2col', 'matmul')
  assert select('cpu', 14, 16, 32, 5) == xla
  # Thin inputs: at most 8 input channels take the shifted dx; one input
  # channel and at most 32 output channels the chunked shifted forward.
  assert select('cpu', 28, 1, 6, 5) == ('chunked', 'shifted', 'xla')
  assert select('cpu', 32, 1, 32, 3) == ('chunked', 'shifted', 'chunked')
  assert select('cpu', 32, 1, 64, 3) == ('xla', 'shifted', 'chunked')
  assert select('cpu', 32, 3, 16, 3) == ('xla', 'shifted', 'chunked')
  assert select('cpu', 14, 6, 16, 5, padding='VALID') == (
      'xla', 'shifted', 'xla')
  assert select('cpu', 14, 8, 16, 5) == ('xla', 'shifted', 'xla')
  assert select('cpu', 14, 9, 16, 5) == xla
  assert select('cpu', 224, 1, 64, 7, 2) == ('xla', 'shifted', 'xla')
  assert select('cpu', 224, 3, 64, 7, 2) == ('xla', 'shifted', 'xla')


def test_auto_takes_the_custom_vjp_on_cpu_only_where_selected():
  # conv_paths shows in the jaxpr as a custom_vjp_call; XLA's path as a
  # bare conv_general_dilated.
  def primitives(hw, ci, k, impl='auto'):
    x = jnp.zeros((2, hw, hw, ci))
    kernel = jnp.zeros((k, k, ci, 8))
    jaxpr = jax.make_jaxpr(lambda a, b: layers.conv2d(a, b, impl=impl))(
        x, kernel)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}

  assert jax.default_backend() == 'cpu'  # tests/conftest.py
  assert 'custom_vjp_call' in primitives(2, 256, 3)
  assert 'custom_vjp_call' in primitives(16, 16, 3)
  assert 'custom_vjp_call' in primitives(16, 16, 1)
  assert primitives(16, 16, 3, impl='xla') == {'conv_general_dilated'}
  # A thin 5x5 layer: oneDNN's paths where it is available, else XLA's.
  assert 'custom_vjp_call' in primitives(16, 16, 5)
  with mock.patch.object(onednn, 'available', lambda: False):
    assert primitives(16, 16, 5) == {'conv_general_dilated'}
  # The same shapes on another backend take XLA's paths.
  with mock.patch.object(jax, 'default_backend', lambda: 'gpu'):
    assert primitives(2, 256, 3) == {'conv_general_dilated'}
    assert 'custom_vjp_call' in primitives(2, 256, 3, impl='fast')


@pytest.mark.parametrize('batch,image_bytes,target,chunk', [
    (128, 32 * 32 * 16 * 4, 512 * 1024, 8),   # ResNet-20's first stage.
    (128, 8 * 8 * 64 * 4, 512 * 1024, 32),
    (6, 100, 400, 3),         # At most 4 images fit; 4 does not divide 6.
    (7, 100, 400, 1),         # A prime batch: one image at a time.
    (8, 10**6, 512, 1),       # One image is over the target.
    (8, 10, 10**6, 8),        # The whole batch fits.
])
def test_batch_chunk(batch, image_bytes, target, chunk):
  assert layers.batch_chunk(batch, image_bytes, target) == chunk


@pytest.mark.parametrize('chunk_bytes', [None, 64 * 1024])
def test_backward_builds_windows_one_layer_at_a_time(chunk_bytes):
  # Without the dependence on dy (conv_paths' backward), XLA builds the
  # kh*kw windows of every layer as soon as its input exists and keeps all
  # of them to the backward pass: the step's scratch memory then grows by
  # nine copies of every layer's input.
  def loss(params, x, impl):
    for k in params:
      x = jnp.tanh(layers.conv2d(x, k, impl=impl))
    return jnp.sum(x)

  # (chunk_bytes: None, the whole batch of 8 is one chunk; 64 KiB, one
  # image per chunk.)
  params = [jnp.ones((3, 3, 16, 16)) * 0.01] * 6
  x = jnp.ones((8, 32, 32, 16))
  with mock.patch.object(layers, 'CHUNK_BYTES',
                         chunk_bytes or layers.CHUNK_BYTES):
    scratch = {
        impl: jax.jit(jax.grad(loss), static_argnums=2).lower(
            params, x, impl).compile().memory_analysis().temp_size_in_bytes
        for impl in ('xla', 'auto')}
  layer_windows = 9 * x.size * 4
  assert scratch['auto'] < scratch['xla'] + 2 * layer_windows, scratch


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



@pytest.mark.parametrize('window', [2, 3])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_tiled_max_pool_splits_ties_as_jax_does(window, dtype):
  # Rounded ReLU outputs: many windows hold 2, 3 or all cells at their
  # maximum (zeros above all). The reference is JAX's own derivative of a
  # reshape and a max reduction, which splits dy equally among the ties.
  x = jnp.maximum(jnp.round(jax.random.normal(
      jax.random.key(0), (2, 6 * window, 4 * window, 5))), 0).astype(dtype)
  n, h, w, c = x.shape

  def reference(a):
    return a.reshape(n, h // window, window, w // window, window, c).max(
        axis=(2, 4))

  probe = jax.random.normal(jax.random.key(1), (n, 6, 4, c)).astype(dtype)
  y_ref, vjp_ref = jax.vjp(reference, x)
  np.testing.assert_array_equal(layers.max_pool(x, window), y_ref)
  g = jax.grad(lambda a: jnp.sum(
      (layers.max_pool(a, window) * probe).astype(jnp.float32)))(x)
  g_ref = vjp_ref(probe)[0]
  assert g.dtype == dtype
  ties = (x.reshape(n, h // window, window, w // window, window, c)
          == y_ref[:, :, None, :, None, :]).sum(axis=(2, 4))
  assert (ties > 1).mean() > 0.3  # The case under test does occur.
  np.testing.assert_allclose(np.asarray(g, np.float32),
                             np.asarray(g_ref, np.float32), rtol=1e-2 if
                             dtype == jnp.bfloat16 else 1e-6)
  # A NaN input: NaN out of its window, and back into all its cells.
  x_nan = x.at[0, 1, 2, 3].set(jnp.nan)
  g_nan = jax.grad(lambda a: jnp.sum(
      (layers.max_pool(a, window) * probe).astype(jnp.float32)))(x_nan)
  g_nan_ref = jax.vjp(reference, x_nan)[1](probe)[0]
  assert np.isnan(np.asarray(g_nan_ref, np.float32)).sum() == window**2
  np.testing.assert_array_equal(np.isnan(np.asarray(g_nan, np.float32)),
                                np.isnan(np.asarray(g_nan_ref, np.float32)))

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


def test_batch_norm_train_gradient_of_all_three_outputs():
  """Through y, the batch mean and the batch variance (which the moving
  averages use): against JAX's derivative of the same formula. (No
  constant channel here: the written-out backward pass sums g * x - mean *
  g, which, like the fast variance, loses digits where |mean| >> std.)"""
  x, g, variables = _bn_case((4, 3, 3, 4), jnp.float32)
  x = x.at[..., 0].set(x[..., 1] - 2.0)
  scale, bias = variables['params']['scale'], variables['params']['bias']
  a, b = jnp.linspace(-2.0, 2.0, 4), jnp.linspace(1.0, 3.0, 4)

  def by_jax(x, scale, bias):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean * mean)
    y = (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias
    return y, mean, var

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias)
      return jnp.sum(jnp.tanh(y) * g) + jnp.sum(mean * a + var * b)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, scale, bias)

  ours = loss(lambda *args: layers.batch_norm_train(*args, 1e-5))
  for got, want in zip(ours, loss(by_jax)):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(want))))


def test_batch_norm_refuses_what_it_does_not_implement():
  x = jnp.ones((2, 3))
  with pytest.raises(NotImplementedError, match='last axis'):
    layers.BatchNorm(use_running_average=False, axis=0).init(
        jax.random.key(0), x)
