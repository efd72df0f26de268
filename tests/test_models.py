"""The model zoo: parameter counts and layer shapes against torchvision, the
papers' CIFAR networks, output shapes at every supported input size, what
each knob changes, train/eval behaviour, one finite training step, and bad
knobs.

torchvision's numbers come from tests/data/torchvision_reference.json
(written by make_torchvision_reference.py next to it, with torchvision
0.28.0); everything else is computed here from the papers' layer tables.
"""

import functools
import json
import pathlib

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import models, summary
from cnn_lab.errors import ConfigError

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / 'data' /
     'torchvision_reference.json').read_text())['models']


def init_shapes(model, input_shape, train=False):
  """(variables, output) as shapes only: nothing allocated or computed."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    out = model.apply(variables, x, train=train, mutable=True,
                      rngs={'dropout': jax.random.key(1)})[0]
    return variables, out

  return jax.eval_shape(run, x)


def init_variables(model, x):
  """Initial variables, as training creates them (steps.create_train_state
  compiles the initialisation with non-partitionable threefry)."""
  with jax.threefry_partitionable(False):
    return jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(1), x)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- Faithfulness: torchvision at 224x224x3, 1000 classes, default knobs. ---

TORCHVISION_NAMES = ['alexnet', 'vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn',
                     'vgg16', 'vgg16_bn', 'vgg19', 'vgg19_bn', 'googlenet',
                     'resnet18', 'resnet34', 'resnet50', 'resnet101',
                     'resnet152']


@pytest.mark.parametrize('name', TORCHVISION_NAMES)
def test_parameter_count_equals_torchvision(name):
  variables, out = init_shapes(
      models.create_model(name=name, num_classes=1000), (1, 224, 224, 3))
  assert out.shape == (1, 1000)
  assert count(variables['params']) == REFERENCE[name]['params']


def test_googlenet_auxiliary_heads_equal_torchvision():
  model = models.create_model(name='googlenet', num_classes=1000,
                              aux_heads=True)
  variables, _ = init_shapes(model, (1, 224, 224, 3))
  assert count(variables['params']) == REFERENCE['googlenet_aux']['params']


@pytest.mark.parametrize('name,knobs', [
    ('alexnet', {}), ('vgg16_bn', {}), ('googlenet', {}), ('resnet18', {}),
    # torchvision strides the bottleneck's 3x3 convolution (ResNet v1.5).
    ('resnet50', {'bottleneck_stride': '3x3'})])
def test_every_layer_shape_and_macs_equal_torchvision(name, knobs):
  model = models.create_model(name=name, num_classes=1000, **knobs)
  rows = summary.summarize(model, (224, 224, 3))
  ref = REFERENCE[name]
  assert [list(r.output_shape) for r in rows] == ref['layer_output_shapes']
  assert sum(r.macs for r in rows) == ref['macs']


def test_resnet50_paper_stride_placement_costs_less():
  # Striding the first 1x1 (the paper) computes the 3x3 of the first block of
  # stages 2-4 on the smaller map: same parameters, fewer multiply-adds.
  paper = summary.summarize(models.create_model(name='resnet50'),
                            (224, 224, 3))
  v15 = summary.summarize(models.create_model(
      name='resnet50', bottleneck_stride='3x3'), (224, 224, 3))
  assert sum(r.params for r in paper) == sum(r.params for r in v15)
  # The paper's "3.8 x 10^9 FLOPs" (multiply-adds) for ResNet-50.
  assert round(sum(r.macs for r in paper) / 1e9, 1) == 3.9
  assert sum(r.macs for r in paper) < sum(r.macs for r in v15)


# --- The papers' small networks, counted from their layer tables. ---

def cifar_resnet_params(depth, classes=10):
  """He et al. 2016, Sec. 4.2, option A: 3x3 convolutions without bias,
  batch norm (scale and shift) after each, no parameters in shortcuts."""
  n = (depth - 2) // 6
  total = 3 * 9 * 16 + 2 * 16  # Stem.
  c_in = 16
  for c in (16, 32, 64):
    for _ in range(n):
      total += 9 * c_in * c + 9 * c * c + 4 * c
      c_in = c
  return total + 64 * classes + classes


@pytest.mark.parametrize('depth,paper_millions', [
    (20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_counts_match_the_paper(depth, paper_millions):
  for prefix in ('resnet', 'plain'):  # Option A: the same count.
    variables, out = init_shapes(
        models.create_model(name=f'{prefix}{depth}', num_classes=10),
        (1, 32, 32, 3))
    assert out.shape == (1, 10)
    assert count(variables['params']) == cifar_resnet_params(depth)
  # Table 6 of the paper rounds to these.
  digits = 1 if depth == 110 else 2
  assert round(cifar_resnet_params(depth) / 1e6, digits) == paper_millions


def test_lenet5_count_at_28_and_32():
  # C1 6x(5x5x1+1), C3 16x(5x5x6+1), C5 120x(400+1), F6 84x(120+1), 10x(84+1).
  expected = 6 * 26 + 16 * 151 + 120 * 401 + 84 * 121 + 10 * 85
  assert expected == 61_706
  for size in (28, 32):
    variables, _ = init_shapes(models.create_model(name='lenet5'),
                               (1, size, size, 1))
    assert count(variables['params']) == expected


def test_nin_cifar_count():
  def conv(k, cin, cout):
    return k * k * cin * cout + cout
  expected = (conv(5, 3, 192) + conv(1, 192, 160) + conv(1, 160, 96)
              + conv(5, 96, 192) + 2 * conv(1, 192, 192)
              + conv(3, 192, 192) + conv(1, 192, 192) + conv(1, 192, 10))
  variables, out = init_shapes(models.create_model(name='nin'),
                               (1, 32, 32, 3))
  assert out.shape == (1, 10)
  assert count(variables['params']) == expected == 966_986


# --- Output shapes at each supported input size. ---

FAMILIES = ['lenet5', 'alexnet', 'nin', 'googlenet', 'googlenet_paper',
            'resnet18', 'resnet50', 'resnet20', 'vgg11_bn']


@pytest.mark.parametrize('size', [28, 32, 64, 224])
@pytest.mark.parametrize('name', FAMILIES)
def test_output_shape_at_each_input_size(name, size):
  model = models.create_model(name=name, num_classes=7)
  if name.startswith('vgg') and size < 32:
    with pytest.raises(ConfigError, match='data.image_size=28.*at least 32'):
      init_shapes(model, (2, size, size, 3))
    return
  _, out = init_shapes(model, (2, size, size, 3), train=True)
  assert out.shape == (2, 7)


# The CIFAR ResNets and plain nets are shape-checked at 32x32 by their
# parameter-count test above.
@pytest.mark.parametrize('name', sorted(
    set(models.MODELS) - set(FAMILIES)
    - {f'{p}{d}' for p in ('resnet', 'plain') for d in (20, 32, 44, 56, 110)}))
def test_every_variant_at_32(name):
  knobs = {'depth': 20} if name == 'cifar_resnet' else {}
  model = models.create_model(name=name, num_classes=10, **knobs)
  _, out = init_shapes(model, (2, 32, 32, 1))
  assert out.shape == (2, 10)


@pytest.mark.parametrize('name,size,maps', [
    # Spatial size of the last feature map: the small-input stems keep the
    # resolution where the ImageNet stems divide it by 4 (or 8 for NiN).
    ('resnet18', 32, 4), ('resnet18', 224, 7), ('resnet20', 32, 8),
    ('googlenet', 32, 8), ('googlenet', 224, 7), ('nin', 32, 8),
    ('nin', 224, 6), ('alexnet', 32, 7), ('alexnet', 224, 13)])
def test_last_feature_map_size(name, size, maps):
  rows = summary.summarize(models.create_model(name=name, num_classes=10),
                           (size, size, 3))
  convs = [r for r in rows if len(r.output_shape) == 3]
  assert convs[-1].output_shape[:2] == (maps, maps)


# --- Each knob changes what it should and nothing else. ---

def param_shapes(name, input_shape=(1, 32, 32, 3), **knobs):
  model = models.create_model(name=name, num_classes=10, **knobs)
  variables, _ = init_shapes(model, input_shape)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  return {jax.tree_util.keystr(k): v.shape for k, v in flat}


def apply_fn(name, **knobs):
  model = models.create_model(name=name, num_classes=10, **knobs)
  return model, jax.jit(functools.partial(model.apply, train=False))


def test_residual_off_keeps_option_a_parameters_and_changes_output():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  res, res_apply = apply_fn('resnet20', width=0.25, conv_impl='xla')
  _, plain_apply = apply_fn('plain20', width=0.25, conv_impl='xla')
  variables = init_variables(res, x)
  assert param_shapes('resnet20') == param_shapes('plain20')
  assert not np.allclose(res_apply(variables, x), plain_apply(variables, x))


def test_shortcut_b_adds_projections_where_the_shape_changes():
  a = param_shapes('resnet20', shortcut='A')
  b = param_shapes('resnet20', shortcut='B')
  c = param_shapes('resnet20', shortcut='C')
  added = {k: v for k, v in b.items() if k not in a}
  blocks = {k.split("']")[0] for k in added}
  assert blocks == {"['stage2_block1", "['stage3_block1"}
  assert added["['stage2_block1']['proj_conv']['kernel']"] == (1, 1, 16, 32)
  assert added["['stage3_block1']['proj_bn']['scale']"] == (64,)
  # Option C projects every one of the 9 shortcuts; plain has none.
  assert len({k.split("']")[0] for k in c if 'proj_conv' in k}) == 9
  assert param_shapes('plain18') == {
      k: v for k, v in param_shapes('resnet18').items() if 'proj' not in k}


def test_bottleneck_stride_moves_the_stride_only():
  kw = dict(input_shape=(1, 64, 64, 3))
  assert param_shapes('resnet50', **kw) == param_shapes(
      'resnet50', bottleneck_stride='3x3', **kw)
  rows = {b: {r.name: r.output_shape for r in summary.summarize(
      models.create_model(name='resnet50', bottleneck_stride=b),
      (64, 64, 3))} for b in ('1x1', '3x3')}
  assert rows['1x1']['stage2_block1/conv1'] == (8, 8, 128)
  assert rows['3x3']['stage2_block1/conv1'] == (16, 16, 128)
  assert rows['1x1']['stage2_block1/conv3'] == rows['3x3'][
      'stage2_block1/conv3']


def test_inception_reduction_knob():
  with_red = param_shapes('googlenet')
  without = param_shapes('googlenet_no_reduction')
  assert {k for k in with_red if 'reduce' in k} and not any(
      'reduce' in k for k in without)
  # Without the reduction the 3x3 and 5x5 branches see all 192 input
  # channels of inception3a; every module's output channels are unchanged.
  assert without["['inception3a']['branch2']['conv']['kernel']"] == (
      3, 3, 192, 128)
  assert with_red["['inception3a']['branch2']['conv']['kernel']"] == (
      3, 3, 96, 128)
  rows_a = summary.group_rows(summary.summarize(
      models.create_model(name='googlenet'), (224, 224, 3)))
  rows_b = summary.group_rows(summary.summarize(
      models.create_model(name='googlenet_no_reduction'), (224, 224, 3)))
  assert len(rows_a) == len(rows_b) == 3 + 9 + 1
  for a, b in zip(rows_a, rows_b):
    assert a.name == b.name and a.output_shape == b.output_shape


def test_inception_fifth_branch_kernels():
  key = "['inception3a']['branch3']['conv']['kernel']"
  assert param_shapes('googlenet')[key] == (3, 3, 16, 32)  # torchvision
  assert param_shapes('googlenet', branch5='5x5')[key] == (5, 5, 16, 32)
  double = param_shapes('googlenet', branch5='3x3x2')
  assert double["['inception3a']['branch3_a']['conv']['kernel']"] == (
      3, 3, 16, 32)
  assert double["['inception3a']['branch3_b']['conv']['kernel']"] == (
      3, 3, 32, 32)


def test_googlenet_paper_knobs():
  shapes = param_shapes('googlenet_paper', input_shape=(1, 224, 224, 3))
  # No batch norm: every convolution has a bias instead.
  assert not any("['bn']" in k for k in shapes)
  assert shapes["['conv1']['conv']['bias']"] == (64,)
  assert shapes["['aux1']['fc1']['kernel']"] == (4 * 4 * 128, 1024)
  assert shapes["['aux2']['conv']['conv']['kernel']"] == (1, 1, 528, 128)


def test_googlenet_fc_head():
  shapes = param_shapes('googlenet', head='fc', input_shape=(1, 224, 224, 3))
  assert shapes["['fc']['kernel']"] == (7 * 7 * 1024, 10)
  assert param_shapes('googlenet', input_shape=(1, 224, 224, 3))[
      "['fc']['kernel']"] == (1024, 10)


def test_alexnet_lrn_and_activation_change_outputs_not_parameters():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  base, base_apply = apply_fn('alexnet', width=0.125, conv_impl='xla')
  variables = init_variables(base, x)
  ref = base_apply(variables, x)
  for knobs in ({'lrn': True}, {'activation': 'tanh'}):
    assert param_shapes('alexnet', width=0.125, **knobs) == param_shapes(
        'alexnet', width=0.125)
    assert not np.allclose(apply_fn('alexnet', width=0.125, conv_impl='xla',
                                    **knobs)[1](variables, x), ref)


def test_lenet_pool_knob():
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  avg, avg_apply = apply_fn('lenet5')
  variables = init_variables(avg, x)
  assert param_shapes('lenet5', (1, 28, 28, 1)) == param_shapes(
      'lenet5', (1, 28, 28, 1), pool='max')
  assert not np.allclose(avg_apply(variables, x),
                         apply_fn('lenet5', pool='max')[1](variables, x))


@pytest.mark.parametrize('name,layer,channels', [
    ('lenet5', "['conv1']['kernel']", 3), ('alexnet', "['conv2']['kernel']", 96),
    ('nin', "['mlpconv1_conv2']['kernel']", 80),
    ('googlenet', "['inception3a']['branch1']['conv']['kernel']", 32),
    ('resnet18', "['stage4_block2']['conv2']['kernel']", 256),
    ('resnet20', "['stage3_block3']['conv1']['kernel']", 32),
    ('vgg11', "['block5_conv2']['kernel']", 256)])
def test_width_halves_channels(name, layer, channels):
  size = 28 if name == 'lenet5' else 32
  model = models.create_model(name=name, num_classes=10, width=0.5)
  _, out = init_shapes(model, (1, size, size, 3))
  assert out.shape == (1, 10)  # The classes are not scaled.
  assert param_shapes(name, (1, size, size, 3), width=0.5)[layer][-1] == (
      channels)
  assert param_shapes(name, (1, size, size, 3))[layer][-1] == 2 * channels


@pytest.mark.parametrize('name', ['lenet5', 'alexnet', 'nin', 'googlenet',
                                  'resnet20', 'resnet18', 'vgg11'])
def test_norm_knob_adds_batch_norm_per_convolution(name):
  with_bn = param_shapes(name, norm='batch')
  without = param_shapes(name, norm='none')
  convs = [k[:-len("['kernel']")] for k, v in with_bn.items()
           if k.endswith("['kernel']") and len(v) == 4]
  assert convs
  for conv in convs:
    # Its batch norm is the sibling named with 'bn' for the last 'conv'
    # (conv1 -> bn1, block1_conv2 -> block1_bn2, .../conv -> .../bn), with
    # one scale per output channel of the convolution.
    head, _, tail = conv.rpartition('conv')
    bn = f'{head}bn{tail}'
    assert with_bn[f"{bn}['scale']"] == (with_bn[f"{conv}['kernel']"][-1],)
  assert not any(k.endswith("['scale']") for k in without)


# --- Train against eval mode, and one training step, per family. ---

# XLA's convolution compiles fastest; the other paths of layers.Conv are
# checked against it in test_layers, and whole networks use them in the
# end-to-end tests.
TINY = {
    'lenet5': dict(norm='batch'),
    'alexnet': dict(width=0.125, norm='batch', conv_impl='xla'),
    'nin': dict(width=0.125, norm='batch', conv_impl='xla'),
    'googlenet': dict(width=0.0625, dropout_rate=0.5, aux_heads=True,
                      conv_impl='xla'),
    'resnet18': dict(width=0.125, conv_impl='xla'),
    'resnet20': dict(width=0.5, conv_impl='xla'),
    'vgg11': dict(width=0.125, norm='batch'),
}


@functools.cache
def tiny_run(name):
  """A tiny model of family `name`, its jitted functions and one step (each
  compiled once per test session)."""
  from cnn_lab import optim, steps
  model = models.create_model(name=name, num_classes=10, **TINY[name])
  size = 28 if name == 'lenet5' else 32
  x = jax.random.normal(jax.random.key(0), (8, size, size, 1))
  batch = {'image': x, 'label': jnp.arange(8) % 10}
  tx, schedule = optim.make_optimizer(name='sgd', learning_rate=0.01,
                                      num_steps=1)
  state = steps.create_train_state(model, tx, (size, size, 1),
                                   jax.random.key(1))
  step = jax.jit(functools.partial(steps.train_step, layer_names=(),
                                   schedule=schedule, aux_loss_weight=0.3))
  new_state, scalars = step(state, batch, jax.random.key(4))
  return dict(
      model=model, x=x, batch=batch, state=state, new_state=new_state,
      scalars=scalars,
      variables={'params': state.params, 'batch_stats': state.batch_stats},
      evaluate=jax.jit(functools.partial(model.apply, train=False)),
      train_apply=jax.jit(lambda v, key: model.apply(
          v, x, train=True, rngs={'dropout': key},
          mutable=['batch_stats', 'aux_logits'])))


# Tests of one family read the same `tiny_run`: one worker each.
@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.xdist_group(f'tiny_{n}'))
    for n in sorted(TINY)])
def test_train_and_eval_modes_and_one_finite_step(name):
  run = tiny_run(name)
  variables, x, evaluate = run['variables'], run['x'], run['evaluate']
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
  out_a, new_a = run['train_apply'](variables, jax.random.key(2))
  out_b, _ = run['train_apply'](variables, jax.random.key(3))
  has_dropout = getattr(run['model'], 'dropout_rate', 0) > 0
  assert np.allclose(out_a, out_b) != has_dropout  # Dropout masks differ.
  # Batch norm: training normalises with the batch's statistics, so
  # without dropout its output still differs from evaluation's (moving
  # averages start at 0 and 1); and it moves the moving averages.
  if not has_dropout:
    assert not np.allclose(out_a, evaluate(variables, x), atol=1e-4)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b),
                       new_a['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(moved))
  # One SGD step: finite, and every parameter received a gradient.
  scalars = run['scalars']
  assert np.isfinite(scalars['train/loss'])
  assert np.isfinite(scalars['grad_norm/global']) and scalars[
      'grad_norm/global'] > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         run['new_state'].params, run['state'].params)
  assert all(jax.tree.leaves(changed))


def _cross_entropy(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), np.asarray(labels)].mean()


@pytest.mark.xdist_group('tiny_googlenet')
def test_auxiliary_heads_only_in_training_with_weighted_loss():
  run = tiny_run('googlenet')
  variables, x = run['variables'], run['x']
  assert {'aux1', 'aux2'} <= set(variables['params'])
  # Evaluation: no auxiliary logits, and the output equals that of the
  # model without auxiliary heads on the shared parameters.
  plain = models.create_model(name='googlenet', num_classes=10,
                              **{**TINY['googlenet'], 'aux_heads': False})
  shared = {'params': {k: v for k, v in variables['params'].items()
                       if not k.startswith('aux')},
            'batch_stats': variables['batch_stats']}
  np.testing.assert_allclose(
      run['evaluate'](variables, x),
      jax.jit(functools.partial(plain.apply, train=False))(shared, x),
      rtol=1e-5, atol=1e-6)
  _, sown = jax.eval_shape(lambda v: run['model'].apply(
      v, x, train=False, mutable=['aux_logits']), variables)
  assert 'aux_logits' not in sown
  # Training: two auxiliary logits, their cross-entropy added with weight
  # 0.3, checked against the step's own dropout key (the auxiliary heads
  # drop 70% of their units).
  key = jax.random.fold_in(jax.random.key(4), 0)
  logits, new = run['train_apply'](variables, key)
  aux = [new['aux_logits'][h]['logits'][0] for h in ('aux1', 'aux2')]
  labels = run['batch']['label']
  scalars = run['scalars']
  np.testing.assert_allclose(scalars['train/loss'],
                             _cross_entropy(logits, labels), rtol=1e-3)
  np.testing.assert_allclose(
      scalars['train/aux_loss'],
      0.3 * (_cross_entropy(aux[0], labels) + _cross_entropy(aux[1], labels)),
      rtol=1e-3)


# --- Bad knobs fail at construction, before anything is traced. ---

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
    (dict(name='resnet20', width=0), 'model.width=0'),
    (dict(name='resnet20', width=-0.5), 'model.width'),
    (dict(name='lenet5', width=float('nan')), 'model.width'),
    (dict(name='cifar_resnet', depth=21), r'model.depth=21.*6n\+2'),
    (dict(name='cifar_resnet', depth=2), 'model.depth'),
    (dict(name='resnet', depth=20), r'model.depth=20.*18, 34, 50, 101, 152'),
    (dict(name='resnet20', depth=56), 'model.depth is not a knob'),
    (dict(name='resnet20', shortcut='D'), 'model.shortcut'),
    (dict(name='resnet20', residual='yes'), 'model.residual.*True or False'),
    (dict(name='googlenet', branch5='7x7'), 'model.branch5'),
    (dict(name='googlenet', head='mlp'), 'model.head'),
    (dict(name='lenet5', pool='median'), 'model.pool'),
    (dict(name='lenet5', dropout_rate=1.0), 'model.dropout_rate'),
    (dict(name='lenet5', bn_momentum=1.0), r'model.bn_momentum.*\[0, 1\)'),
    (dict(name='resnet20', bn_momentum=-0.1), 'model.bn_momentum'),
])
def test_bad_knobs(knobs, match):
  with pytest.raises(ConfigError, match=match):
    models.create_model(**knobs)


@pytest.mark.parametrize('name,size', [
    ('lenet5', 20), ('alexnet', 24), ('vgg16', 28), ('resnet20', 6),
    ('googlenet', 16), ('nin', 16), ('resnet50', 16)])
def test_input_too_small_is_a_config_error(name, size):
  model = models.create_model(name=name, num_classes=10)
  with pytest.raises(ConfigError, match=f'data.image_size={size} is too '
                     'small'):
    init_shapes(model, (1, size, size, 1))


@pytest.mark.parametrize('init,expected_std', [
    ('he_normal', lambda fan_in, fan_out: np.sqrt(2 / fan_in)),
    ('glorot_uniform', lambda fan_in, fan_out: np.sqrt(2 / (fan_in + fan_out))),
    ('lecun_normal', lambda fan_in, fan_out: np.sqrt(1 / fan_in)),
    ('normal', lambda fan_in, fan_out: 0.05),
    # N(0, 0.05^2) cut at 2 std (as torchvision's scipy truncnorm), whose
    # std is 0.8796 of the untruncated one.
    ('truncated_normal', lambda fan_in, fan_out: 0.05 * 0.87962566),
])
def test_kernel_init_scales(init, expected_std):
  model = models.create_model(name='lenet5', kernel_init=init, init_std=0.05)
  params = init_variables(model, jnp.zeros((1, 28, 28, 1)))['params']
  for layer, fan_in, fan_out in (('fc1', 400, 120),
                                 ('conv2', 5 * 5 * 6, 5 * 5 * 16)):
    kernel = np.asarray(params[layer]['kernel'])
    np.testing.assert_allclose(kernel.std(), expected_std(fan_in, fan_out),
                               rtol=0.05 if layer == 'conv2' else 0.02)
  if init == 'truncated_normal':
    assert np.abs(np.asarray(params['fc1']['kernel'])).max() <= 0.1 + 1e-6


@pytest.mark.parametrize('name', ['lenet5', 'resnet20'])
def test_bn_momentum_weights_the_old_moving_mean(name):
  """One training-mode pass from moving means of zero: the first batch norm's
  new moving mean is (1 - momentum) times the batch mean of the convolution
  it follows, taken here from the captured convolution output."""
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1)) + 0.5
  moved = {}
  for momentum in (0.9, 0.5):
    model = models.create_model(name=name, num_classes=10, norm='batch',
                                bn_momentum=momentum, conv_impl='xla')
    variables = init_variables(model, x)
    _, updated = model.apply(variables, x, train=True,
                             mutable=['batch_stats', 'intermediates'],
                             capture_intermediates=lambda m, _: (
                                 m.name == 'conv1'))
    conv1 = updated['intermediates']['conv1']['__call__'][0]
    batch_mean = np.asarray(conv1).mean(axis=(0, 1, 2))
    new_mean = np.asarray(updated['batch_stats']['bn1']['mean'])
    np.testing.assert_allclose(new_mean, (1 - momentum) * batch_mean,
                               rtol=1e-4, atol=1e-6)
    moved[momentum] = new_mean
  assert not np.allclose(moved[0.9], moved[0.5])


def test_lenet_dropout_only_in_training():
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  plain = models.create_model(name='lenet5', num_classes=10)
  dropped = models.create_model(name='lenet5', num_classes=10,
                                dropout_rate=0.5)
  variables = init_variables(plain, x)
  assert param_shapes('lenet5', (1, 28, 28, 1)) == param_shapes(
      'lenet5', (1, 28, 28, 1), dropout_rate=0.5)
  rngs = {'dropout': jax.random.key(2)}
  ref = plain.apply(variables, x, train=True, rngs=rngs)
  np.testing.assert_allclose(dropped.apply(variables, x, train=False),
                             plain.apply(variables, x, train=False),
                             rtol=1e-6)
  assert not np.allclose(dropped.apply(variables, x, train=True, rngs=rngs),
                         ref)
  # Half the units of fc1's activation dropped, the rest scaled by 2.
  _, inter = dropped.apply(variables, x, train=True, rngs=rngs,
                           mutable=['intermediates'],
                           capture_intermediates=lambda m, _: isinstance(
                               m, nn.Dropout))
  kept = np.asarray(jax.tree.leaves(inter)[0])
  assert 0.35 < (kept == 0).mean() < 0.65
