"""cnn_lab.kernels: every convolution path against
jax.lax.conv_general_dilated, the path selector, oneDNN's build, tiled max
pooling's gradient and batch norm's written-out gradient."""

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

from cnn_lab import kernels
from cnn_lab.errors import ConfigError
from cnn_lab.kernels import direct, onednn, select, winograd
from cnn_lab.kernels.geometry import conv_geometry

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
    out, vjp = jax.vjp(lambda a, b: kernels.conv2d(a, b, (s, s), padding,
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
        set(select.CONV_FNS) - {'winograd', 'onednn'})
assert {p[2] for p in PATHS} == set(select.KERNEL_GRAD_FNS) - {'winograd',
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
    case for case in PATH_CASES if winograd.winograd_applies(
        (case[5],) * 2, (case[6],) * 2,
        conv_geometry(case[1:3], (case[5],) * 2, (case[6],) * 2,
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
  pads, out_hw = conv_geometry((h, w), (k, k), (s, s), padding)
  probe = jax.random.normal(kg, (n, *out_hw, co)).astype(dtype)
  f32 = [np.asarray(a, np.float32) for a in (x, kernel, probe)]
  ref = jax.jit(vjp_of, static_argnums=0)(
      lambda a, b: reference(a, b, s, pads), *f32)
  return (x, kernel, probe), [np.asarray(r) for r in ref]


def run_conv_paths(case, paths, dtype):
  """(output, dx, dw) of `conv_paths` with `paths` on `case` in `dtype`,
  and the float32 reference on the same (rounded) values."""
  (x, kernel, probe), ref = path_case(case, dtype)
  s, pads = case[6], conv_geometry(case[1:3], (case[5],) * 2,
                                          (case[6],) * 2, case[7])[0]
  conv = lambda a, b: select.conv_paths(a, b, (s, s), pads, paths)
  # One image per chunk, so that the scans of the chunked forward pass and
  # kernel gradient run over the batch (2 or 3 images here).
  with mock.patch.object(direct, 'CHUNK_BYTES', 1):
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
    got = winograd.WINOGRAD_AT @ ((winograd.WINOGRAD_G @ g) *
                                (winograd.WINOGRAD_BT @ d))
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
      lambda x, k: direct.conv_chunked(x, k, (1, 1), 'SAME'))(
          jnp.zeros((batch, hw, hw, 1)), jnp.zeros((5, 5, 1, 6)))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert [e.params['length'] for e in scans] == [want]


@pytest.mark.parametrize('kernel,strides,padding', [
    (3, 2, 'SAME'), (3, 1, 'VALID'), (5, 1, 'SAME'), (1, 1, 'SAME')])
def test_conv_winograd_refuses_other_convolutions(kernel, strides, padding):
  x, k = jnp.zeros((1, 8, 8, 2)), jnp.zeros((kernel, kernel, 2, 2))
  assert not winograd.winograd_applies(
      (kernel, kernel), (strides, strides),
      conv_geometry((8, 8), (kernel,) * 2, (strides,) * 2,
                           padding)[0])
  with pytest.raises(ValueError, match='3x3 kernels at stride 1'):
    winograd.conv_winograd(x, k, (strides, strides), padding)


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
  assert_float32_close(*run_conv_paths(case, select.ONEDNN_PATHS,
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
    kernels.conv2d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                  impl='onednn')
  with mock.patch.object(jax, 'default_backend', lambda: 'gpu'):
    with pytest.raises(ConfigError, match='not float32 on gpu'):
      kernels.conv2d(x, kernel, impl='onednn')


def test_onednn_build_names_a_missing_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-g++'))
  with pytest.raises(RuntimeError, match='no-such-g\\+\\+'):
    onednn.build()


def test_select_conv_paths_with_onednn():
  def paths_for(ci, co, k=3, s=1, hw=32, dtype=jnp.float32, backend='cpu'):
    return select.select_conv_paths(backend, (128, hw, hw, ci),
                                    (k, k, ci, co), (s, s), 'SAME', dtype,
                                    with_onednn=True)

  onednn_paths = ('onednn', 'onednn', 'onednn')
  # float32 layers with fewer than 128 channels on either side, any kernel.
  for shape in [(16, 16), (3, 16), (1, 6, 5), (6, 16, 5), (64, 64, 1),
                (16, 32, 3, 2), (3, 64, 7, 2), (127, 512), (512, 64)]:
    assert paths_for(*shape) == onednn_paths, shape
  # Wider ones, bfloat16 and other backends: as without oneDNN.
  for kwargs in [dict(ci=128, co=128), dict(ci=256, co=512, hw=8),
                 dict(ci=128, co=256, k=1),
                 dict(ci=16, co=16, dtype=jnp.bfloat16),
                 dict(ci=16, co=16, backend='gpu')]:
    without = select.select_conv_paths(
        kwargs.get('backend', 'cpu'), (128, kwargs.get('hw', 32),
                                       kwargs.get('hw', 32), kwargs['ci']),
        (kwargs.get('k', 3),) * 2 + (kwargs['ci'], kwargs['co']), (1, 1),
        'SAME', kwargs.get('dtype', jnp.float32))
    assert paths_for(**kwargs) == without != onednn_paths, kwargs


def test_select_conv_paths_cpu_only():
  def paths_for(backend, hw, ci, co, k, s=1, padding='SAME'):
    return select.select_conv_paths(backend, (128, hw, hw, ci), (k, k, ci, co),
                                    (s, s), padding)

  xla = ('xla', 'xla', 'xla')
  shapes = [(2, 512, 512, 3), (32, 16, 16, 3), (16, 32, 64, 3, 2),
            (28, 1, 6, 5), (8, 64, 64, 1), (224, 3, 64, 7, 2)]
  for backend in ('gpu', 'tpu', 'cuda', 'rocm', 'METAL'):
    assert all(paths_for(backend, *shape) == xla for shape in shapes)
  # CPU: tiny maps take im2col for all three products; 3x3 kernels on
  # larger maps Winograd's or per-tap matmuls for dw; 1x1 kernels matmuls
  # for all three; kernels of 5x5 and more keep XLA's paths, except for
  # thin inputs (below).
  assert paths_for('cpu', 2, 512, 512, 3) == ('im2col', 'im2col', 'matmul')
  assert paths_for('cpu', 3, 64, 64, 3, padding='VALID') == (
      'im2col', 'im2col', 'matmul')                       # A 1x1 output.
  # 3x3 'SAME' at stride 1 in float32: Winograd's dw from 32 input and
  # output channels on, and its forward and dx from 128 on.
  winograd = ('winograd', 'winograd', 'winograd')
  assert paths_for('cpu', 4, 512, 512, 3) == winograd
  assert paths_for('cpu', 16, 128, 128, 3) == winograd
  assert paths_for('cpu', 8, 128, 256, 3) == winograd
  assert paths_for('cpu', 16, 64, 128, 3) == ('xla', 'xla', 'winograd')
  assert paths_for('cpu', 32, 64, 64, 3) == ('xla', 'xla', 'winograd')
  assert paths_for('cpu', 16, 32, 32, 3) == ('xla', 'xla', 'winograd')
  assert paths_for('cpu', 32, 16, 16, 3) == ('xla', 'xla', 'chunked')
  assert paths_for('cpu', 32, 16, 64, 3) == ('xla', 'xla', 'chunked')
  # Other 3x3 layers, and bfloat16: dw over chunks of the batch.
  assert paths_for('cpu', 32, 16, 32, 3, 2) == ('xla', 'xla', 'chunked')
  assert paths_for('cpu', 32, 16, 16, 3, padding='VALID') == (
      'xla', 'xla', 'chunked')
  assert select.select_conv_paths(
      'cpu', (128, 8, 8, 256), (3, 3, 256, 256), (1, 1), 'SAME',
      jnp.bfloat16) == ('xla', 'xla', 'chunked')
  assert paths_for('cpu', 8, 64, 64, 1) == ('im2col', 'im2col', 'matmul')
  assert paths_for('cpu', 8, 64, 64, 1, 2) == ('im2col', 'im2col', 'matmul')
  assert paths_for('cpu', 14, 16, 32, 5) == xla
  # Thin inputs: at most 8 input channels take the shifted dx; one input
  # channel and at most 32 output channels the chunked shifted forward.
  assert paths_for('cpu', 28, 1, 6, 5) == ('chunked', 'shifted', 'xla')
  assert paths_for('cpu', 32, 1, 32, 3) == ('chunked', 'shifted', 'chunked')
  assert paths_for('cpu', 32, 1, 64, 3) == ('xla', 'shifted', 'chunked')
  assert paths_for('cpu', 32, 3, 16, 3) == ('xla', 'shifted', 'chunked')
  assert paths_for('cpu', 14, 6, 16, 5, padding='VALID') == (
      'xla', 'shifted', 'xla')
  assert paths_for('cpu', 14, 8, 16, 5) == ('xla', 'shifted', 'xla')
  assert paths_for('cpu', 14, 9, 16, 5) == xla
  assert paths_for('cpu', 224, 1, 64, 7, 2) == ('xla', 'shifted', 'xla')
  assert paths_for('cpu', 224, 3, 64, 7, 2) == ('xla', 'shifted', 'xla')


def test_auto_takes_the_custom_vjp_on_cpu_only_where_selected():
  # conv_paths shows in the jaxpr as a custom_vjp_call; XLA's path as a
  # bare conv_general_dilated.
  def primitives(hw, ci, k, impl='auto'):
    x = jnp.zeros((2, hw, hw, ci))
    kernel = jnp.zeros((k, k, ci, 8))
    jaxpr = jax.make_jaxpr(lambda a, b: kernels.conv2d(a, b, impl=impl))(
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
  assert direct.batch_chunk(batch, image_bytes, target) == chunk


@pytest.mark.parametrize('chunk_bytes', [None, 64 * 1024])
def test_backward_builds_windows_one_layer_at_a_time(chunk_bytes):
  # Without the dependence on dy (conv_paths' backward), XLA builds the
  # kh*kw windows of every layer as soon as its input exists and keeps all
  # of them to the backward pass: the step's scratch memory then grows by
  # nine copies of every layer's input.
  def loss(params, x, impl):
    for k in params:
      x = jnp.tanh(kernels.conv2d(x, k, impl=impl))
    return jnp.sum(x)

  # (chunk_bytes: None, the whole batch of 8 is one chunk; 64 KiB, one
  # image per chunk.)
  params = [jnp.ones((3, 3, 16, 16)) * 0.01] * 6
  x = jnp.ones((8, 32, 32, 16))
  with mock.patch.object(direct, 'CHUNK_BYTES',
                         chunk_bytes or direct.CHUNK_BYTES):
    scratch = {
        impl: jax.jit(jax.grad(loss), static_argnums=2).lower(
            params, x, impl).compile().memory_analysis().temp_size_in_bytes
        for impl in ('xla', 'auto')}
  layer_windows = 9 * x.size * 4
  assert scratch['auto'] < scratch['xla'] + 2 * layer_windows, scratch


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
  pool = lambda a: kernels.max_pool(a, window, window, 'VALID')
  np.testing.assert_array_equal(pool(x), y_ref)
  g = jax.grad(lambda a: jnp.sum((pool(a) * probe).astype(jnp.float32)))(x)
  g_ref = vjp_ref(probe)[0]
  assert g.dtype == dtype
  ties = (x.reshape(n, h // window, window, w // window, window, c)
          == y_ref[:, :, None, :, None, :]).sum(axis=(2, 4))
  assert (ties > 1).mean() > 0.3  # The case under test does occur.
  np.testing.assert_allclose(np.asarray(g, np.float32),
                             np.asarray(g_ref, np.float32), rtol=1e-2 if
                             dtype == jnp.bfloat16 else 1e-6)
  # A NaN input: NaN out of its window, and back into all its cells, also
  # under jit (where XLA turns a product by a 0/1 mask into a select).
  x_nan = x.at[0, 1, 2, 3].set(jnp.nan)
  g_nan = jax.jit(jax.grad(lambda a: jnp.sum(
      (pool(a) * probe).astype(jnp.float32))))(x_nan)
  g_nan_ref = jax.vjp(reference, x_nan)[1](probe)[0]
  assert np.isnan(np.asarray(g_nan_ref, np.float32)).sum() == window**2
  np.testing.assert_array_equal(np.isnan(np.asarray(g_nan, np.float32)),
                                np.isnan(np.asarray(g_nan_ref, np.float32)))


def test_tiled_max_pool_gradient_after_batch_norm_under_jit():
  """LeNet-5's second block (convolution, batch norm, ReLU, 2x2 max
  pooling) at its shape in the network, jitted. XLA recomputed the ReLU's
  output inside the pooling gradient's fusions, rounded differently from
  the fusion that computed the forward pass's y (a fused multiply-add in
  one and not the other): compared with y, whole windows had no maximum,
  and the gradients here came out NaN. Against the same block with
  `nn.max_pool` (which gives a tie to its first cell, not a share to
  each: the ties here are ReLU zeros, whose cells the ReLU's derivative
  zeroes either way)."""
  kx, kk, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (64, 14, 14, 6))
  kernel = jax.random.normal(kk, (5, 5, 6, 16)) * 0.1
  probe = jax.random.normal(kp, (64, 5, 5, 16))
  scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.5, 0.5, 16)

  def grads(pool):
    def loss(x, kernel, scale, bias):
      h = kernels.conv2d(x, kernel, (1, 1), 'VALID', 'xla')
      h = kernels.batch_norm_train(h, scale, bias, 1e-5)[0]
      return jnp.sum(pool(jax.nn.relu(h)) * probe)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        x, kernel, scale, bias)

  ours = grads(lambda a: kernels.max_pool(a, 2, 2, 'VALID'))
  theirs = grads(lambda a: nn.max_pool(a, (2, 2), (2, 2)))
  for got, want in zip(ours, theirs):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_batch_norm_train_gradient_of_all_three_outputs():
  """Through y, the batch mean and the batch variance (which the moving
  averages use): against JAX's derivative of the same formula. (No
  constant channel here: the written-out backward pass sums g * x - mean *
  g, which, like the fast variance, loses digits where |mean| >> std.)"""
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 4)) * 2 + 3
  x = x.at[..., 0].set(x[..., 1] - 2.0)
  g = jax.random.normal(jax.random.key(1), x.shape)
  scale, bias = jnp.linspace(0.5, 1.5, 4), jnp.linspace(-1.0, 1.0, 4)
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

  ours = loss(lambda *args: kernels.batch_norm_train(*args, 1e-5))
  for got, want in zip(ours, loss(by_jax)):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(want))))

