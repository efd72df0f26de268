"""Device check: compile and run cnn_lab's train step on an accelerator.

Synthetic data (no TFDS needed); prints the backend, which convolution path
each VGG layer takes, compile time, and images/s for VGG16 with and without
batch norm at 32x32 and VGG16-BN at 224x224.

  python experiments/gpu_check.py
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, '.')
from cnn_lab import layers, metrics, models, optim, train  # noqa: E402


def measure(name, norm, size, batch, steps=20):
  model = models.create_model(name=name, norm=norm, num_classes=10)
  tx, schedule = optim.make_optimizer(name='sgd', learning_rate=0.01,
                                      num_steps=100)
  shape = (size, size, 3)
  state = train.create_train_state(model, tx, shape, jax.random.key(0))
  names = metrics.layer_order(
      model, {'params': state.params, 'batch_stats': state.batch_stats},
      jnp.zeros((1, *shape)))
  step = jax.jit(functools.partial(train.train_step, layer_names=tuple(names),
                                   schedule=schedule), donate_argnums=(0,))
  data = {'image': jax.random.normal(jax.random.key(1), (batch, *shape)),
          'label': jnp.arange(batch) % 10}
  t = time.perf_counter()
  state, scalars = step(state, data, jax.random.key(2))
  jax.block_until_ready(scalars)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    state, scalars = step(state, data, jax.random.key(2))
  jax.block_until_ready(scalars)
  rate = steps * batch / (time.perf_counter() - t)
  ok = all(bool(jnp.isfinite(v)) for v in scalars.values())
  print(f'{name:6} norm={norm:5} {size}x{size} batch {batch}: compile '
        f'{compile_s:.1f}s, {rate:,.0f} img/s, finite metrics: {ok}, '
        f'{len(names)} layers, loss {float(scalars["train/loss"]):.3f}',
        flush=True)


def main():
  print('backend:', jax.default_backend(), jax.devices(), flush=True)
  x = jnp.zeros((2, 2, 2, 512))
  k = jnp.zeros((3, 3, 512, 512))
  prims = {e.primitive.name for e in jax.make_jaxpr(layers.conv2d)(x, k).eqns}
  print('2x2 map conv uses XLA conv:', 'conv_general_dilated' in prims)
  measure('vgg16', 'none', 32, 128)
  measure('vgg16', 'batch', 32, 128)
  measure('vgg16', 'batch', 224, 64, steps=10)


if __name__ == '__main__':
  main()
