"""Per-layer gradient norms: keys, forward order, values checked by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_lab import layers, metrics, models, steps


class TwoLayer(nn.Module):
  """Names chosen so that alphabetical order is the reverse of forward."""

  @nn.compact
  def __call__(self, x, *, train):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(4, name='zeta')(x))
    return nn.Dense(3, name='alpha')(x)


def test_layer_order_is_forward_not_alphabetical():
  model = TwoLayer()
  x = jnp.ones((2, 5))
  variables = model.init(jax.random.key(0), x, train=False)
  assert metrics.layer_order(model, variables, x) == ['zeta', 'alpha']


def test_vgg_layer_order_reads_like_the_paper():
  model = models.create_model(name='vgg11', norm='batch', num_classes=10)
  x = jnp.zeros((1, 32, 32, 1))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  names = metrics.layer_order(model, variables, x)
  assert names == [
      'block1_conv1', 'block1_bn1', 'block2_conv1', 'block2_bn1',
      'block3_conv1', 'block3_bn1', 'block3_conv2', 'block3_bn2',
      'block4_conv1', 'block4_bn1', 'block4_conv2', 'block4_bn2',
      'block5_conv1', 'block5_bn1', 'block5_conv2', 'block5_bn2',
      'fc1', 'fc2', 'fc3']


def test_train_step_grad_norms_match_hand_computation():
  """Softmax regression: dL/dW = X^T (P - Y) / N, dL/db = mean(P - Y)."""
  model = TwoLayer()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  tx = optax.sgd(0.1)
  state = steps.create_train_state(model, tx, (5,), jax.random.key(0))
  names = metrics.layer_order(model, {'params': state.params}, x)
  params = jax.device_get(state.params)
  _, scalars = steps.train_step(
      state, {'image': jnp.asarray(x), 'label': jnp.asarray(labels)},
      jax.random.key(1), layer_names=tuple(names),
      schedule=optax.constant_schedule(0.1))

  grads = _hand_grads(params, x, labels)
  g_w1, g_b1 = grads['zeta']['kernel'], grads['zeta']['bias']
  g_w2, g_b2 = grads['alpha']['kernel'], grads['alpha']['bias']
  w1, b1 = params['zeta']['kernel'], params['zeta']['bias']
  w2, b2 = params['alpha']['kernel'], params['alpha']['bias']
  logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  norm_alpha = np.sqrt((g_w2**2).sum() + (g_b2**2).sum())
  norm_zeta = np.sqrt((g_w1**2).sum() + (g_b1**2).sum())
  loss = -np.log(p[np.arange(6), labels]).mean()

  np.testing.assert_allclose(scalars['train/loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(scalars['grad_norm/alpha'], norm_alpha,
                             rtol=1e-5)
  np.testing.assert_allclose(scalars['grad_norm/zeta'], norm_zeta, rtol=1e-5)
  np.testing.assert_allclose(scalars['grad_norm/global'],
                             np.hypot(norm_alpha, norm_zeta), rtol=1e-5)
  assert {k for k in scalars if k.startswith('grad_norm/')} == {
      'grad_norm/global', 'grad_norm/zeta', 'grad_norm/alpha'}


def _hand_grads(params, x, labels):
  """Gradients of TwoLayer's mean cross-entropy, in float64 numpy."""
  w1, b1 = params['zeta']['kernel'], params['zeta']['bias']
  w2, b2 = params['alpha']['kernel'], params['alpha']['bias']
  pre = x @ w1 + b1
  h = np.maximum(pre, 0)
  logits = h @ w2 + b2
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dlogits = (p - np.eye(3)[labels]) / len(x)
  dpre = (dlogits @ w2.T) * (pre > 0)
  return {'zeta': {'kernel': x.T @ dpre, 'bias': dpre.sum(0)},
          'alpha': {'kernel': h.T @ dlogits, 'bias': dlogits.sum(0)}}


def test_layer_stats_and_update_ratio_under_sgd_momentum():
  """Two steps of SGD with momentum 0.9: the second update is
  -lr * (g2 + 0.9 * g1), so its ratio to the weights depends on both."""
  model = TwoLayer()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  lr, mom = 0.5, 0.9
  state = steps.create_train_state(model, optax.sgd(lr, momentum=mom), (5,),
                                   jax.random.key(0))
  batch = {'image': jnp.asarray(x), 'label': jnp.asarray(labels)}
  step = jax.jit(lambda s: steps.train_step(
      s, batch, jax.random.key(1), layer_names=('zeta', 'alpha'),
      schedule=optax.constant_schedule(lr)))

  p0 = jax.tree.map(lambda a: np.asarray(a, np.float64),
                    jax.device_get(state.params))
  g1 = _hand_grads(p0, x.astype(np.float64), labels)
  p1 = jax.tree.map(lambda p, g: p - lr * g, p0, g1)
  g2 = _hand_grads(p1, x.astype(np.float64), labels)
  p2 = jax.tree.map(lambda p, a, b: p - lr * (b + mom * a), p1, g1, g2)

  state, _ = step(state)
  _, scalars = step(state)
  for layer in ('zeta', 'alpha'):
    g = np.concatenate([g2[layer]['kernel'].ravel(), g2[layer]['bias']])
    old = np.concatenate([p1[layer]['kernel'].ravel(), p1[layer]['bias']])
    new = np.concatenate([p2[layer]['kernel'].ravel(), p2[layer]['bias']])
    np.testing.assert_allclose(scalars[f'grad_mean_abs/{layer}'],
                               np.abs(g).mean(), rtol=1e-4)
    np.testing.assert_allclose(scalars[f'grad_max_abs/{layer}'],
                               np.abs(g).max(), rtol=1e-4)
    np.testing.assert_allclose(scalars[f'param_norm/{layer}'],
                               np.linalg.norm(old), rtol=1e-5)
    ratio = np.linalg.norm(new - old) / np.linalg.norm(old)
    np.testing.assert_allclose(scalars[f'update_ratio/{layer}'], ratio,
                               rtol=1e-3)
    # Without momentum's memory of g1 the ratio would differ.
    assert not np.isclose(ratio, lr * np.linalg.norm(g) /
                          np.linalg.norm(old), rtol=1e-2)


class Watched(nn.Module):
  """Two activation sites, one inside a submodule."""

  @nn.compact
  def __call__(self, x):
    x = layers.Activation('tanh', name='act1')(nn.Dense(4, name='fc1')(x))

    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        return layers.Activation('relu', name='act')(nn.Dense(3)(x))

    return Block(name='block')(x)


def test_watch_activations_records_each_site_inside_it_only():
  model = Watched()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)) * 3,
                  jnp.float32)
  variables = model.init(jax.random.key(0), x)
  mutable = [metrics.STATS_COLLECTION, metrics.VALUES_COLLECTION]
  # Outside the context, the sites are plain functions: nothing recorded.
  _, outside = model.apply(variables, x, mutable=mutable)
  assert not outside
  with metrics.watch_activations():
    y, recorded = model.apply(variables, x, mutable=mutable)
  # The values each site returned, computed here without the sites.
  p = variables['params']
  h1 = np.tanh(x @ p['fc1']['kernel'] + p['fc1']['bias'])
  dense = p['block']['Dense_0']
  h2 = np.maximum(h1 @ dense['kernel'] + dense['bias'], 0)
  np.testing.assert_allclose(y, h2, rtol=1e-5, atol=1e-6)
  values = recorded[metrics.VALUES_COLLECTION]
  np.testing.assert_allclose(values['act1']['value'], h1, rtol=1e-5)
  np.testing.assert_allclose(values['block']['act']['value'], h2,
                             rtol=1e-5, atol=1e-6)
  stats = metrics.collect_activation_stats(
      recorded[metrics.STATS_COLLECTION],
      [('act1', 'tanh'), ('block/act', 'relu')])
  np.testing.assert_allclose(stats['act_mean/act1'], h1.mean(), rtol=1e-5)
  np.testing.assert_allclose(stats['act_std/block/act'], h2.std(),
                             rtol=1e-5)
  assert stats['act_saturated/act1'] == np.mean(h1 ** 2 > 0.9)
  assert stats['act_dead/block/act'] == np.mean(h2.max(axis=0) <= 0)
  assert set(stats) == {'act_mean/act1', 'act_std/act1',
                        'act_saturated/act1', 'act_mean/block/act',
                        'act_std/block/act', 'act_dead/block/act'}
