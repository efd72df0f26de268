"""Activation, batch-norm, non-finite and probe statistics, each checked
against values computed independently (numpy, float64) on tiny models; the
histograms and the monotonic check on short real runs."""

import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnn_lab import check, layers, metrics, steps, train
from configs import lenet5_classic


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_activation_stats_by_hand():
  rng = np.random.default_rng(0)
  pre = rng.normal(scale=4.0, size=(8, 5, 5, 3))
  # Saturated: the derivative below a tenth of its maximum (1/4 for the
  # sigmoid, 1 for tanh), written with the derivatives themselves.
  for kind, fn, deriv, peak in (
      ('sigmoid', _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), 0.25),
      ('tanh', np.tanh, lambda x: 1 - np.tanh(x) ** 2, 1.0)):
    y = fn(pre)
    stats = metrics.activation_stats(jnp.asarray(y, jnp.float32), kind)
    expected = np.mean(deriv(pre) < 0.1 * peak)
    assert 0.2 < expected < 0.8  # The test data reach both regions.
    np.testing.assert_allclose(stats['saturated'], expected, atol=1e-6)
    np.testing.assert_allclose(stats['mean'], y.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats['std'], y.std(), rtol=1e-5)
    assert 'dead' not in stats

  # ReLU: channel 1 never fires; channel 3 fires at one position of one
  # example only, so it is alive; 1 of 4 channels is dead.
  pre = rng.normal(size=(4, 3, 3, 4))
  pre[..., 1] = -np.abs(pre[..., 1])
  pre[..., 3] = -np.abs(pre[..., 3])
  pre[2, 1, 0, 3] = 0.5
  stats = metrics.activation_stats(jnp.asarray(np.maximum(pre, 0)), 'relu')
  assert stats['dead'] == 0.25
  assert 'saturated' not in stats


class BNNet(nn.Module):
  """Dense -> batch norm -> activation -> dropout -> dense."""
  activation: str = 'sigmoid'
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(4, name='fc1')(x)
    x = layers.make_norm('batch', train, 'bn1')(x)
    x = layers.Activation(self.activation, name='act1')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(3, name='fc2')(x)


def _tiny_state(model, tx=None):
  state = steps.create_train_state(model, tx or optax.sgd(0.1), (5,),
                                   jax.random.key(0))
  x = jnp.zeros((1, 5))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return (state, tuple(metrics.layer_order(model, variables, x)),
          tuple(metrics.activation_sites(model, variables, x)))


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 3, n), jnp.int32)}


def test_activation_and_bn_stats_in_the_train_step():
  model = BNNet()
  state, names, sites = _tiny_state(model)
  assert names == ('fc1', 'bn1', 'fc2')
  assert sites == (('act1', 'sigmoid'),)
  x = jnp.zeros((1, 5))
  bn_layers = tuple(metrics.batch_norm_layers(
      model, {'params': state.params, 'batch_stats': state.batch_stats}, x))
  assert bn_layers == (('bn1', layers.BN_MOMENTUM, 1e-5),)
  # Running statistics away from the batch's, and a BN scale of 5 that
  # pushes the sigmoid into saturation.
  rng = np.random.default_rng(3)
  run_mean = rng.normal(size=4)
  run_var = rng.uniform(0.5, 3.0, size=4)
  params = jax.device_get(state.params)
  params['bn1']['scale'] = np.full(4, 5.0, np.float32)
  state = state.replace(
      params=jax.tree.map(jnp.asarray, params),
      batch_stats={'bn1': {'mean': jnp.asarray(run_mean, jnp.float32),
                           'var': jnp.asarray(run_var, jnp.float32)}})
  batch = _batch()
  _, scalars = steps.train_step(
      state, batch, jax.random.key(1), layer_names=names,
      activation_sites=sites, bn_layers=bn_layers,
      schedule=optax.constant_schedule(0.1))

  x = np.asarray(batch['image'], np.float64)
  h = x @ params['fc1']['kernel'] + params['fc1']['bias']
  mean, var = h.mean(0), h.var(0)
  z = (h - mean) / np.sqrt(var + 1e-5) * 5.0 + params['bn1']['bias']
  y = _sigmoid(z)
  saturated = np.mean(y * (1 - y) < 0.025)
  assert 0 < saturated < 1
  np.testing.assert_allclose(scalars['act_saturated/act1'], saturated,
                             atol=1e-6)
  np.testing.assert_allclose(scalars['act_mean/act1'], y.mean(), rtol=1e-4)
  np.testing.assert_allclose(scalars['act_std/act1'], y.std(), rtol=1e-4)
  np.testing.assert_allclose(
      scalars['bn_mean_gap/bn1'],
      np.mean(np.abs(mean - run_mean) / np.sqrt(run_var + 1e-5)), rtol=1e-4)
  np.testing.assert_allclose(
      scalars['bn_var_gap/bn1'],
      np.mean(np.abs(var - run_var) / (run_var + 1e-5)), rtol=1e-4)
  assert not any(k.startswith('bn_') and not k.endswith('/bn1')
                 for k in scalars)


class BackwardBlowUp(nn.Module):
  """fc1 -> ReLU -> fc2 (all zeros) -> sqrt -> fc3: the forward pass is
  finite (sqrt(0) = 0), but sqrt's derivative at 0 is infinite, so the
  backward pass turns non-finite at fc2 and stays so below it; fc3's
  gradient (its input is 0) is finite."""

  @nn.compact
  def __call__(self, x, *, train):
    x = layers.Activation('relu', name='act1')(nn.Dense(4, name='fc1')(x))
    x = nn.Dense(4, name='fc2', kernel_init=nn.initializers.zeros)(x)
    return nn.Dense(3, name='fc3')(jnp.sqrt(x))


class ForwardBlowUp(nn.Module):
  """fc1 -> act1 -> fc2 -> act2 -> fc3, for a NaN put into fc2."""

  @nn.compact
  def __call__(self, x, *, train):
    x = layers.Activation('relu', name='act1')(nn.Dense(4, name='fc1')(x))
    x = layers.Activation('relu', name='act2')(nn.Dense(4, name='fc2')(x))
    return nn.Dense(3, name='fc3')(x)


def _step_fn(names, sites, layer_stats=True):
  return jax.jit(lambda s, b: steps.train_step(
      s, b, jax.random.key(0), layer_names=names, activation_sites=sites,
      schedule=optax.constant_schedule(0.1), layer_stats=layer_stats))


@pytest.mark.parametrize('layer_stats', [True, False])
def test_nonfinite_origin_backward_pass(layer_stats):
  state, names, sites = _tiny_state(BackwardBlowUp())
  step = _step_fn(names, sites, layer_stats)
  assert list(state.first_nonfinite) == [-1, -1, -1]
  state, scalars = step(state, _batch())
  assert math.isfinite(scalars['train/loss'])
  if layer_stats:
    assert math.isfinite(scalars['grad_norm/fc3'])
    assert not math.isfinite(scalars['grad_max_abs/fc2'])
    assert not math.isfinite(scalars['grad_max_abs/fc1'])
  # Started in fc2 (index 1): not fc1, the first non-finite layer in
  # forward order, where it merely arrived.
  assert list(state.first_nonfinite) == [1, names.index('fc2'), -1]
  state, _ = step(state, _batch(seed=1))  # Stays at the first occurrence.
  assert list(state.first_nonfinite) == [1, 1, -1]


@pytest.mark.parametrize('layer_stats', [True, False])
def test_nonfinite_origin_forward_pass(layer_stats):
  state, names, sites = _tiny_state(ForwardBlowUp())
  params = jax.tree.map(np.array, jax.device_get(state.params))
  params['fc2']['kernel'][0, 0] = np.nan
  state = state.replace(params=jax.tree.map(jnp.asarray, params))
  state, scalars = _step_fn(names, sites, layer_stats)(state, _batch())
  if layer_stats:
    assert math.isfinite(scalars['act_mean/act1'])
    assert not math.isfinite(scalars['act_mean/act2'])
  else:  # No activation statistics: the step ran the forward pass again.
    assert 'act_mean/act2' not in scalars
  # The forward pass went non-finite at act2; every gradient followed.
  assert [s for s, _ in sites] == ['act1', 'act2']
  assert list(state.first_nonfinite) == [1, names.index('fc3'), 1]
  assert metrics.first_true([jnp.bool_(False), jnp.bool_(False)]) == -1
  flags = [jnp.bool_(v) for v in (False, True, False, True)]
  assert metrics.first_true(flags) == 1
  assert metrics.first_true(flags, last=True) == 3


def test_a_global_norm_overflow_counts_as_non_finite_at_no_origin():
  # fc3's weights at +-1e20: the loss and every gradient entry stay finite
  # (fc2's and fc1's near 1e20-1e21), but their squares overflow float32,
  # and so does the global norm. The step is recorded as the first
  # non-finite one, at no layer or activation, and skipping drops it.
  state, names, sites = _tiny_state(ForwardBlowUp())
  params = jax.tree.map(np.array, jax.device_get(state.params))
  signs = np.sign(np.random.default_rng(0).normal(size=(4, 3)))
  params['fc3']['kernel'] = (1e20 * signs).astype(np.float32)
  state = state.replace(params=jax.tree.map(jnp.asarray, params))
  step = jax.jit(lambda s, b: steps.train_step(
      s, b, jax.random.key(0), layer_names=names, activation_sites=sites,
      schedule=optax.constant_schedule(0.1), skip_nonfinite=True))
  new_state, scalars = step(state, _batch())
  assert math.isfinite(scalars['train/loss'])
  assert not math.isfinite(scalars['grad_norm/global'])
  assert all(math.isfinite(scalars[f'grad_max_abs/{n}']) for n in names)
  assert max(scalars[f'grad_max_abs/{n}'] for n in names) > 1e19
  assert list(new_state.first_nonfinite) == [1, -1, -1]
  assert int(new_state.skipped_steps) == 1 and int(new_state.step) == 1
  for new, old in zip(jax.tree.leaves(new_state.params),
                      jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(new, old)
  assert 'the global gradient norm overflowed' in train._nonfinite_where(
      new_state.first_nonfinite, names, sites)


def test_probe_loss_is_deterministic_and_the_dropout_loss_is_not():
  model = BNNet(activation='relu', dropout_rate=0.5)
  state, names, sites = _tiny_state(model)
  batch = _batch(32)
  probe = jax.jit(steps.probe_step)
  first, second = probe(state, batch), probe(state, batch)
  assert first['probe/loss'] == second['probe/loss']

  step = jax.jit(lambda s, k: steps.train_step(
      s, batch, k, layer_names=names, activation_sites=sites,
      schedule=optax.constant_schedule(0.1))[1]['train/loss'])
  noisy = {float(step(state, jax.random.key(k))) for k in range(3)}
  assert len(noisy) == 3  # A new dropout mask, a new loss.

  # Independently: the same weights in a model without dropout, in
  # training mode (batch statistics), and in evaluation mode.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  plain = BNNet(activation='relu', dropout_rate=0.0)
  logits, _ = plain.apply(variables, batch['image'], train=True,
                          mutable=['batch_stats'])
  loss = metrics.cross_entropy(logits, batch['label']).mean()
  eval_loss = metrics.cross_entropy(
      plain.apply(variables, batch['image'], train=False),
      batch['label']).mean()
  np.testing.assert_allclose(first['probe/loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(first['probe/eval_mode_loss'], eval_loss,
                             rtol=1e-6)
  np.testing.assert_allclose(first['probe/bn_train_eval_gap'],
                             eval_loss - loss, rtol=1e-5, atol=1e-7)
  assert abs(first['probe/bn_train_eval_gap']) > 1e-3


def _lenet_config(**overrides):
  config = lenet5_classic.get_config()
  config.model.width = 0.5
  config.train.num_steps = 4
  config.train.batch_size = 16
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.eval_num_examples = 50
  config.probe_batch_size = 64
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _read_histograms(workdir: pathlib.Path) -> dict:
  """tag -> {step: (number of values, largest |bucket edge|)} from the
  TensorBoard event files."""
  import tensorflow as tf
  counts = {}
  for path in (workdir / 'tensorboard').glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        meta = value.metadata.plugin_data.plugin_name
        if meta == 'histograms':
          buckets = tf.make_ndarray(value.tensor)  # (left, right, count)
          counts.setdefault(value.tag, {})[event.step] = (
              int(round(buckets[:, 2].sum())),
              float(np.abs(buckets[:, :2]).max()))
  return counts


def test_real_run_writes_histograms_and_activation_sites(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(_lenet_config(histogram_every_steps=2), workdir)
  layers_json = json.loads((workdir / 'layers.json').read_text())
  sites = json.loads((workdir / 'activations.json').read_text())
  assert [s['name'] for s in sites] == [
      'act1', 'act2', 'fc1_act', 'fc2_act']
  assert {s['activation'] for s in sites} == {'tanh'}
  hist = _read_histograms(workdir)
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  train_lines = [l for l in lines if 'train/loss' in l]
  by_step = {l['step']: l for l in train_lines}
  for layer in layers_json:  # Every gradient entry, at steps 1, 2 and 4,
    name = layer['name']    # spanning the step's own max |g|.
    assert sorted(hist[f'grads/{name}']) == [1, 2, 4]
    for step, (count, edge) in hist[f'grads/{name}'].items():
      assert count == layer['num_params']
      np.testing.assert_allclose(edge, by_step[step][f'grad_max_abs/{name}'],
                                 rtol=1e-5)
  # act1: 6 maps of 28x28 (width 0.5: 3 maps) per example, batch 16; tanh
  # keeps it within (-1, 1).
  count, edge = hist['activations/act1'][1]
  assert count == 16 * 28 * 28 * 3 and 0 < edge < 1
  for site in ('act1', 'act2', 'fc1_act', 'fc2_act'):
    assert 0 <= train_lines[-1][f'act_saturated/{site}'] <= 1
    assert f'act_dead/{site}' not in train_lines[-1]  # tanh: no dead units.
  assert all('probe/loss' in l for l in train_lines)
  assert 'probe/bn_train_eval_gap' not in train_lines[-1]  # No batch norm.


def test_cadence_logs_the_first_step_when_asked():
  plain = train.Cadence(num_steps=10, log_every=4, eval_every=10,
                        checkpoint_every=10, histogram_every=0)
  first = train.Cadence(num_steps=10, log_every=4, eval_every=10,
                        checkpoint_every=10, histogram_every=0, first=True)
  assert [s for s in range(1, 11) if plain.logs(s)] == [4, 8, 10]
  assert [s for s in range(1, 11) if first.logs(s)] == [1, 4, 8, 10]
  assert [s for s in range(1, 11) if first.evaluates(s)] == [10]


def test_log_first_step_and_no_plots(tmp_path):
  """log_first_step adds step 1 (the gradients at initialisation) to the
  logged steps; plots=False leaves WORKDIR/plots empty."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(_lenet_config(log_every_steps=3,
                                         log_first_step=True, plots=False),
                           workdir)
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  logged = [l['step'] for l in lines if 'train/loss' in l]
  assert logged == [1, 3, 4]
  assert all('grad_norm/conv1' in l for l in lines if 'train/loss' in l)
  assert not list((workdir / 'plots').glob('*'))


@pytest.mark.parametrize('field', ['log_first_step', 'plots'])
def test_bool_fields_are_checked(tmp_path, field):
  with pytest.raises(train.ConfigError, match=f'{field}=.yes. is not allowed'):
    train.validate_config(ml_collections.ConfigDict(
        {**_lenet_config().to_dict(), field: 'yes'}), tmp_path / 'run')



def test_dropout_off_cost_falls_monotonically(tmp_path, capsys):
  """The sanity check of the issue: dropout off (VGG's hidden layers drop
  nothing), a small learning rate; the probe loss falls at every step."""
  from configs import vgg11_nobn
  config = vgg11_nobn.get_config()
  config.model.update(width=0.125, dropout_rate=0.0)
  config.optim.update(name='adam', learning_rate=1e-3, weight_decay=0.0,
                      schedule='constant')
  config.train.update(num_steps=5, batch_size=32)
  config.update(log_every_steps=1, eval_every_steps=0, eval_num_examples=50,
                probe_batch_size=128)
  train.train_and_evaluate(config, tmp_path / 'run')
  capsys.readouterr()
  assert check.main(['monotonic', str(tmp_path / 'run')]) == 0
  assert 'monotonic: probe/loss over 5 logged steps' in (
      capsys.readouterr().out)


def test_diverging_run_names_where_nonfinite_values_started(tmp_path,
                                                           capsys):
  config = _lenet_config(**{'model.activation': 'relu',
                            'optim.learning_rate': 1e12})
  with pytest.raises(train.Diverged):  # on_nonfinite='halt', the default.
    train.train_and_evaluate(config, tmp_path / 'run')
  out = capsys.readouterr().out
  lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  flagged = [l for l in lines if 'nonfinite/first_step' in l]
  assert len(flagged) == 1  # Reported once, at the first log step after.
  line = flagged[0]
  step = line['nonfinite/first_step']
  assert 1 <= step <= line['step']
  names = [l['name'] for l in json.loads(
      (tmp_path / 'run' / 'layers.json').read_text())]
  sites = [s['name'] for s in json.loads(
      (tmp_path / 'run' / 'activations.json').read_text())]
  # Logged every step: the line of that step, and the one before it.
  at_step = {l['step']: l for l in lines if 'train/loss' in l}
  finite = lambda v: math.isfinite(float(v))
  assert step == min(s for s, l in at_step.items()
                     if not finite(l['grad_norm/global']))
  now = at_step[step]
  if 'nonfinite/first_activation' in line:  # The forward pass overflowed.
    site = line['nonfinite/first_activation']
    i = sites.index(site)
    assert not finite(now[f'act_mean/{site}'])
    assert all(finite(now[f'act_mean/{s}']) for s in sites[:i])
    assert f'forward pass first at activation {site}' in out
  else:  # The backward pass: deeper layers (computed first) are finite.
    layer = line['nonfinite/first_grad_layer']
    i = names.index(layer)
    assert not finite(now[f'grad_max_abs/{layer}'])
    assert all(finite(now[f'grad_max_abs/{n}']) for n in names[i + 1:])
    assert f'backward pass first in layer {layer}' in out
  assert f'non-finite values from step {step} on' in out


def _fake_run(path, values, key='probe/loss'):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for i, v in enumerate(values, 1):
      f.write(json.dumps({'step': 10 * i, key: v}) + '\n')
  return str(path)


def test_check_monotonic(tmp_path, capsys):
  assert check.find_rises([1, 2, 3], [3.0, 2.0, 2.0]) == []
  assert check.find_rises([1, 2, 3], [3.0, 2.0, 2.5]) == [(3, 2.0, 2.5)]
  # Within the relative tolerance: 1.0 -> 1.0005 passes at 1e-3.
  assert check.find_rises([1, 2], [1.0, 1.0005], 1e-3) == []
  assert check.find_rises([1, 2], [1.0, 1.0005], 1e-4) == [(2, 1.0, 1.0005)]
  assert check.find_rises([1, 2], [1.0, float('nan')]) != []

  falling = _fake_run(tmp_path / 'a', [2.0, 1.5, 1.2, 1.1])
  assert check.main(['monotonic', falling]) == 0
  assert 'monotonic: probe/loss over 4 logged steps' in capsys.readouterr().out
  rising = _fake_run(tmp_path / 'b', [2.0, 1.5, 1.7, 1.1])
  assert check.main(['monotonic', rising]) == 1
  assert 'step 30: 1.500000 -> 1.700000' in capsys.readouterr().out
  assert check.main(['monotonic', rising, '--tolerance', '0.2']) == 0
  short = _fake_run(tmp_path / 'c', [2.0])
  for args in (['monotonic', short], ['monotonic', str(tmp_path / 'none')],
               ['monotonic', falling, '--tolerance', '-1']):
    assert check.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1


@pytest.mark.parametrize('field,value', [('histogram_every_steps', -1),
                                         ('probe_batch_size', 0)])
def test_bad_instrumentation_fields_are_rejected(tmp_path, field, value):
  from cnn_lab.errors import ConfigError
  config = _lenet_config()
  config[field] = value
  with pytest.raises(ConfigError, match=field):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
