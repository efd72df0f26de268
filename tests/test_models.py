"""The VGG family: shapes, variable collections, parameter counts, knobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import models
from cnn_lab.errors import ConfigError

# torchvision.models.vgg*(num_classes=1000) parameter counts.
TORCHVISION_COUNTS = {
    ('vgg11', 'none'): 132_863_336, ('vgg11', 'batch'): 132_868_840,
    ('vgg13', 'none'): 133_047_848, ('vgg13', 'batch'): 133_053_736,
    ('vgg16', 'none'): 138_357_544, ('vgg16', 'batch'): 138_365_992,
    ('vgg19', 'none'): 143_667_240, ('vgg19', 'batch'): 143_678_248,
}


def shapes(model, input_shape, train=False):
  """Variable shapes and output shape, without allocating or computing."""
  x = jnp.zeros(input_shape)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(
      lambda v: model.apply(v, x, train=train, rngs={'dropout':
                                                     jax.random.key(1)},
                            mutable=['batch_stats'] if train else False),
      variables)
  return variables, out


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,norm', sorted(TORCHVISION_COUNTS))
def test_parameter_count_matches_torchvision_at_224(name, norm):
  model = models.create_model(name=name, norm=norm, num_classes=1000)
  variables, out = shapes(model, (1, 224, 224, 3))
  assert out.shape == (1, 1000)
  assert count(variables['params']) == TORCHVISION_COUNTS[(name, norm)]


@pytest.mark.parametrize('name', sorted(models.MODELS))
@pytest.mark.parametrize('norm', ['none', 'batch'])
def test_small_input_shapes_and_collections(name, norm):
  model = models.create_model(name=name, norm=norm, num_classes=10)
  variables, out = shapes(model, (4, 32, 32, 1))
  assert out.shape == (4, 10)
  expected = {'params', 'batch_stats'} if norm == 'batch' else {'params'}
  assert set(variables) == expected
  # The 32x32 head is 512-512-10 on a 1x1x512 feature map.
  assert variables['params']['fc1']['kernel'].shape == (512, 512)
  convs = [k for k in variables['params'] if '_conv' in k]
  assert len(convs) == {'vgg11': 8, 'vgg13': 10, 'vgg16': 13,
                        'vgg19': 16}[name]
  if norm == 'batch':
    # One mean and one variance per channel of each convolution.
    stats = variables['batch_stats']
    assert sorted(stats) == sorted(k.replace('_conv', '_bn') for k in convs)
    assert stats['block1_bn1']['mean'].shape == (64,)
    assert stats['block5_bn1']['var'].shape == (512,)


def test_batch_norm_train_vs_eval_and_dropout():
  model = models.create_model(name='vgg11', norm='batch', num_classes=10,
                              dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  eval1 = apply(variables, x, train=False)
  eval2 = apply(variables, x, train=False)
  np.testing.assert_array_equal(eval1, eval2)  # Deterministic in eval.
  train_a, upd = apply(variables, x, train=True, mutable=('batch_stats',),
                       rngs={'dropout': jax.random.key(2)})
  train_b, _ = apply(variables, x, train=True, mutable=('batch_stats',),
                     rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(train_a, train_b)  # Different dropout masks.
  # Training updates the moving averages towards the batch statistics.
  old = variables['batch_stats']['block1_bn1']['mean']
  new = upd['batch_stats']['block1_bn1']['mean']
  assert not np.allclose(old, new)


def test_input_too_small_is_a_config_error():
  model = models.create_model(name='vgg16', num_classes=10)
  with pytest.raises(ConfigError, match='at least 32x32'):
    shapes(model, (1, 28, 28, 1))


@pytest.mark.parametrize('knobs,match', [
    (dict(name='vgg17'), 'model.name'),
    (dict(name='vgg16', norm='layer'), 'model.norm'),
    (dict(name='vgg16', activation='gelu'), 'model.activation'),
    (dict(name='vgg16', dropout_rate=1.0), r'model.dropout_rate.*\[0, 1\)'),
    (dict(name='vgg16', dropout_rate=-0.1), 'model.dropout_rate'),
    (dict(name='vgg16', kernel_init='orthogonal'), 'model.kernel_init'),
    (dict(name='vgg16', kernel_init='normal', init_std=0), 'model.init_std'),
    (dict(name='vgg16', num_classes=0), 'model.num_classes'),
    (dict(name='vgg16', residual=True), 'model.residual is not a knob'),
])
def test_bad_knobs(knobs, match):
  with pytest.raises(ConfigError, match=match):
    models.create_model(**knobs)


@pytest.mark.parametrize('init,expected_std', [
    ('he_normal', lambda fan_in, fan_out: np.sqrt(2 / fan_in)),
    ('glorot_uniform', lambda fan_in, fan_out: np.sqrt(2 / (fan_in + fan_out))),
    ('lecun_normal', lambda fan_in, fan_out: np.sqrt(1 / fan_in)),
    ('normal', lambda fan_in, fan_out: 0.05),
])
def test_kernel_init_scales(init, expected_std):
  model = models.create_model(name='vgg11', num_classes=10, kernel_init=init,
                              init_std=0.05)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros(
      (1, 32, 32, 3)), train=False))()['params']
  kernel = np.asarray(params['block4_conv2']['kernel'])  # 3x3x512x512
  fan_in, fan_out = 9 * 512, 9 * 512
  np.testing.assert_allclose(kernel.std(), expected_std(fan_in, fan_out),
                             rtol=0.02)
