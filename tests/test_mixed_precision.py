"""Mixed precision, `model.dtype='bfloat16'`: convolutions, dense layers and
activations compute in bfloat16, while parameters, batch-norm statistics,
logits, the loss and the gradients stay float32.

Every family is checked on the CPU against its own float32 model with the
same float32 parameters, on the same batch and dropout masks.

- Logits (evaluation mode). bfloat16 keeps 8 significant bits: each
  rounding (of an input, a weight, a layer's output) is off by at most
  2^-9 = 0.2%, and independent roundings add up roughly in quadrature.
  Through these tiny networks the logits move by 0.5-1.2% of their largest
  magnitude (measured); the bound, 5%, is four times that.
- Gradients, compared by direction (the angle between the two gradients,
  every array flattened into one vector). At initialisation, with batch
  norm in training mode on a batch of 8, the gradient is ill-conditioned:
  rounding nothing but the input images to bfloat16 already turns the
  float32 gradient by 0.3-22 degrees (cosine 0.93-0.99998), and bfloat16,
  which rounds at every layer forwards and backwards, turns it 1.5-2x as far
  (measured). So the bound is a cosine of 0.99 (8.1 degrees) or, where the
  gradient is that sensitive, three times the angle of the rounded input,
  whichever is larger; evaluation mode (batch norm a fixed affine map) is
  checked the same way. Per layer, batch norm's scale and shift (sums of
  many terms that mostly cancel) turn further; they are not checked alone.
- Neither check passes by accident: the bfloat16 results must differ from
  float32's, and the jaxprs show every convolution and matrix product of the
  bfloat16 model (forward and backward) with bfloat16 operands and every one
  of the float32 model with float32 ones, so a model that ignored `dtype`
  fails.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import layers, metrics, models, optim, steps
from cnn_lab.errors import ConfigError

# model name, knobs, input size: one tiny network per family, with its
# optional layers switched on (batch norm, LRN, dropout, auxiliary heads,
# projection shortcuts) and both convolution paths (XLA's; 'auto' takes
# im2col or shifted matmuls on the CPU).
FAMILIES = {
    'lenet5': ('lenet5', dict(norm='batch'), 28),
    'alexnet': ('alexnet', dict(width=0.125, norm='batch', lrn=True,
                                conv_impl='xla'), 32),
    'vgg11_bn': ('vgg11_bn', dict(width=0.125), 32),
    'nin': ('nin', dict(width=0.125, norm='batch', conv_impl='xla'), 32),
    'googlenet': ('googlenet', dict(width=0.0625, aux_heads=True,
                                    conv_impl='xla'), 32),
    'resnet18': ('resnet18', dict(width=0.125, shortcut='C',
                                  conv_impl='xla'), 32),
    'resnet20': ('resnet20', dict(width=0.25), 32),
}
BATCH = 8
# Every test of a family reads the same `family_run`: one worker each.
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.xdist_group(f'mp_{f}'))
                 for f in sorted(FAMILIES)]
LOGIT_RTOL = 0.05  # max |bf16 - f32| / max |f32| (module docstring).
MAX_GRAD_ANGLE = 8.1  # Degrees: cosine similarity 0.99.


def dtypes_of(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def matmul_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """Operand dtypes of every convolution and dot_general in `jaxpr`,
  nested jaxprs (jit, custom_jvp, cond, ...) included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns'):
            visit(sub)
          elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
            visit(sub.jaxpr)

  visit(jaxpr.jaxpr if hasattr(jaxpr, 'jaxpr') else jaxpr)
  return found


@functools.cache
def family_run(family: str, dtype: str) -> dict:
  """Model `family` in `dtype` on a fixed batch: its initial state; the loss,
  logits, batch statistics and gradients of training mode as the train step
  computes them (cnn_lab.train, fixed dropout key); the logits of
  evaluation mode and the gradient of their loss. One compilation. For
  float32, also the same on the images rounded to bfloat16 (`rounded`)."""
  name, knobs, size = FAMILIES[family]
  model = models.create_model(name=name, num_classes=10, dtype=dtype, **knobs)
  tx, _ = optim.make_optimizer(name='sgd', learning_rate=0.01, num_steps=1)
  state = steps.create_train_state(model, tx, (size, size, 1),
                                   jax.random.key(1))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(BATCH, size, size, 1)), jnp.float32)
  labels = jnp.arange(BATCH) % 10

  def run(state, images):
    batch = {'image': images, 'label': labels}
    loss, aux_loss, logits, new_vars, grads = steps._loss_and_grads(
        state, batch, jax.random.key(2), 0.3)

    def eval_loss(params):
      logits = model.apply(steps._variables(state, params), images,
                           train=False)
      return metrics.cross_entropy(logits, labels).mean(), logits

    (_, eval_logits), eval_grads = jax.value_and_grad(
        eval_loss, has_aux=True)(state.params)
    return dict(loss=loss, aux_loss=aux_loss, logits=logits,
                batch_stats=new_vars.get('batch_stats', {}), grads=grads,
                eval_logits=eval_logits, eval_grads=eval_grads)

  traced = jax.jit(run).trace(state, images)
  compiled = traced.lower().compile()
  out = dict(state=state, **compiled(state, images),
             matmuls=matmul_operand_dtypes(traced.jaxpr))
  if dtype == 'float32':
    out['rounded'] = compiled(
        state, images.astype(jnp.bfloat16).astype(jnp.float32))
  return out


@pytest.mark.parametrize('family', FAMILY_PARAMS)
def test_bfloat16_keeps_float32_parameters_and_statistics(family):
  f32, bf16 = family_run(family, 'float32'), family_run(family, 'bfloat16')
  for run in (f32, bf16):
    state = run['state']
    assert dtypes_of(state.params) == {'float32'}
    assert dtypes_of(state.batch_stats) == {'float32'}  # All have BN.
    assert dtypes_of(run['batch_stats']) == {'float32'}  # After training.
  # The same variables: trees, shapes, and (the initialisation does not
  # depend on the compute dtype) values.
  for a, b in ((f32['state'].params, bf16['state'].params),
               (f32['state'].batch_stats, bf16['state'].batch_stats)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert jax.tree.structure(f32['batch_stats']) == jax.tree.structure(
      bf16['batch_stats'])


@pytest.mark.parametrize('family', FAMILY_PARAMS)
def test_bfloat16_runs_every_matmul_in_bfloat16(family):
  for dtype in ('float32', 'bfloat16'):
    matmuls = family_run(family, dtype)['matmuls']
    assert matmuls  # Forward and backward convolutions and dense layers.
    assert {d for operands in matmuls for d in operands} == {dtype}


@pytest.mark.parametrize('family', FAMILY_PARAMS)
def test_bfloat16_logits_close_to_float32(family):
  f32, bf16 = family_run(family, 'float32'), family_run(family, 'bfloat16')
  ref, out = np.asarray(f32['eval_logits']), np.asarray(bf16['eval_logits'])
  assert out.dtype == np.float32 and out.shape == ref.shape == (BATCH, 10)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel < LOGIT_RTOL  # Rounded (not float32), but only so much.
  assert bf16['logits'].dtype == jnp.float32  # Training mode's.


def angle(a, b) -> float:
  """Angle in degrees between two gradients (all their arrays flattened)."""
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(
      np.float64) for t in (a, b))
  cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


@pytest.mark.parametrize('family', FAMILY_PARAMS)
def test_bfloat16_loss_and_gradients_float32_and_close(family):
  f32, bf16 = family_run(family, 'float32'), family_run(family, 'bfloat16')
  assert bf16['loss'].dtype == jnp.float32
  np.testing.assert_allclose(bf16['loss'], f32['loss'], rtol=LOGIT_RTOL)
  if f32['aux_loss'] is not None:  # GoogLeNet's auxiliary heads.
    assert bf16['aux_loss'].dtype == jnp.float32
    np.testing.assert_allclose(bf16['aux_loss'], f32['aux_loss'],
                               rtol=LOGIT_RTOL)
  for mode in ('grads', 'eval_grads'):  # Training and evaluation mode.
    assert dtypes_of(bf16[mode]) == {'float32'}
    assert jax.tree.structure(bf16[mode]) == jax.tree.structure(f32[mode])
    turned = angle(f32[mode], bf16[mode])
    # The float32 gradient's own sensitivity: how far it turns when only
    # the input images are rounded to bfloat16 (module docstring).
    sensitivity = angle(f32[mode], f32['rounded'][mode])
    assert 0 < turned < max(MAX_GRAD_ANGLE, 3 * sensitivity), (
        mode, turned, sensitivity)


@pytest.mark.parametrize('family', ['alexnet', 'resnet20'])
def test_bfloat16_train_steps_finite_with_float32_state(family):
  """Three steps of cnn_lab.steps.train_step with every statistic on:
  finite float32 scalars, float32 parameters, optimiser state and batch
  statistics, and the batch statistics moved."""
  name, knobs, size = FAMILIES[family]
  model = models.create_model(name=name, num_classes=10, dtype='bfloat16',
                              **knobs)
  tx, schedule = optim.make_optimizer(name='sgd', learning_rate=0.01,
                                      num_steps=3)
  state = steps.create_train_state(model, tx, (size, size, 1),
                                   jax.random.key(1))
  x = jnp.zeros((1, size, size, 1))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  step = jax.jit(functools.partial(
      steps.train_step, schedule=schedule,
      layer_names=tuple(metrics.layer_order(model, variables, x)),
      activation_sites=tuple(metrics.activation_sites(model, variables, x)),
      bn_layers=tuple(metrics.batch_norm_layers(model, variables, x))))
  rng = np.random.default_rng(0)
  start = state
  for _ in range(3):
    batch = {'image': jnp.asarray(rng.normal(size=(BATCH, size, size, 1)),
                                  jnp.float32),
             'label': jnp.asarray(rng.integers(0, 10, BATCH))}
    state, scalars = step(state, batch, jax.random.key(4))
    assert any(k.startswith('act_dead/') for k in scalars)
    assert any(k.startswith('bn_mean_gap/') for k in scalars)
    for key, value in scalars.items():
      assert value.dtype == jnp.float32, key
      assert np.isfinite(value), key
  assert int(state.step) == 3
  assert int(state.first_nonfinite[0]) == -1
  for tree in (state.params, state.opt_state, state.batch_stats):
    assert dtypes_of(tree) <= {'float32', 'int32'}
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                       state.batch_stats, start.batch_stats)
  assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize('impl', ['xla', 'shifted', 'im2col'])
def test_conv_computes_in_dtype_with_float32_weights(impl):
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  conv = lambda dtype: layers.Conv(4, (3, 3), impl=impl, dtype=dtype)
  variables = conv(jnp.float32).init(jax.random.key(1), x)
  assert dtypes_of(conv(jnp.bfloat16).init(jax.random.key(1), x)) == {
      'float32'}
  ref = conv(jnp.float32).apply(variables, x)
  out = conv(jnp.bfloat16).apply(variables, x)
  assert out.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert 0 < rel < 0.02  # One product of 27 terms, rounded.


@pytest.mark.parametrize('fn', [
    lambda x: layers.max_pool(x, 2), lambda x: layers.max_pool(x, 3, 2, 1),
    lambda x: layers.avg_pool(x, 3, 2, 'CEIL'),
    lambda x: layers.avg_pool(x, 3, 1, 1),
    lambda x: layers.adaptive_avg_pool(x, 4), layers.global_avg_pool,
    layers.local_response_norm])
def test_pools_and_lrn_keep_bfloat16(fn):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8)) * 30
  out = fn(x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  ref = fn(x.astype(jnp.bfloat16).astype(jnp.float32))
  err = np.abs(np.asarray(out, np.float32) - ref).max()
  assert err <= 2**-7 * np.abs(ref).max()  # A few bfloat16 roundings.


@pytest.mark.parametrize('dtype,match', [
    ('float16x', "model.dtype='float16x' is not allowed; choose one of "
                 "'float32', 'bfloat16'"),
    ('float16', 'model.dtype'),
    (16, "model.dtype=16 is not allowed; it must be a string"),
])
def test_bad_dtype_is_a_config_error(dtype, match):
  with pytest.raises(ConfigError, match=match) as err:
    models.create_model(name='resnet20', dtype=dtype)
  assert '\n' not in str(err.value)
