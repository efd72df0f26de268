"""Schedules and optimiser chains against their formulas."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_lab import optim
from cnn_lab.errors import ConfigError


def test_cosine_with_warmup():
  lr = optim.make_schedule(learning_rate=0.1, schedule='cosine',
                           num_steps=110, warmup_steps=10)
  np.testing.assert_allclose(lr(0), 0.0)
  np.testing.assert_allclose(lr(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.05, rtol=1e-5)  # Half-way: cos = 0.
  np.testing.assert_allclose(lr(110), 0.0, atol=1e-8)


def test_step_schedule():
  lr = optim.make_schedule(learning_rate=1.0, schedule='step', num_steps=100,
                           step_boundaries=(0.5, 0.75), step_factor=0.1)
  assert [float(lr(s)) for s in (0, 49, 51, 74, 76, 99)] == pytest.approx(
      [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_sgd_momentum_and_weight_decay_on_kernels_only():
  tx, _ = optim.make_optimizer(name='sgd', learning_rate=0.1, num_steps=10,
                               momentum=0.9, weight_decay=0.01)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  grads = {'kernel': jnp.full((2, 2), 0.5), 'bias': jnp.full((2,), 0.5)}
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  # Step 1: trace = g + wd * w; update = -lr * trace.
  np.testing.assert_allclose(u1['kernel'], -0.1 * (0.5 + 0.01))
  np.testing.assert_allclose(u1['bias'], -0.1 * 0.5)
  u2, _ = tx.update(grads, state, params)
  # Step 2: trace = g + 0.9 * previous trace.
  np.testing.assert_allclose(u2['kernel'], -0.1 * (0.51 + 0.9 * 0.51),
                             rtol=1e-6)


def test_gradient_clipping():
  tx, _ = optim.make_optimizer(name='sgd', learning_rate=1.0, num_steps=10,
                               momentum=0.0, grad_clip_norm=1.0)
  params = {'w': jnp.zeros(2)}
  updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(params),
                         params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='rmsprop'), 'optim.name'),
    (dict(learning_rate=0.0), 'optim.learning_rate'),
    (dict(learning_rate=-1.0), 'optim.learning_rate'),
    (dict(learning_rate=float('nan')), 'optim.learning_rate'),
    (dict(schedule='exponential'), 'optim.schedule'),
    (dict(weight_decay=-1.0), 'optim.weight_decay'),
    (dict(warmup_steps=-5), 'optim.warmup_steps'),
])
def test_bad_optimizer_settings(kwargs, match):
  args = dict(name='sgd', learning_rate=0.1, num_steps=10) | kwargs
  with pytest.raises(ConfigError, match=match):
    optim.make_optimizer(**args)
