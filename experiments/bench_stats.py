r"""What the per-layer statistics cost: the train step with every statistic
on (`config.layer_stats=True`: gradient, weight, update, activation and
batch-norm statistics at every step) against off, in one process, on the
same synthetic batch.

  .venv/bin/python experiments/bench_stats.py [--models=vgg16_bn,resnet20]
      [--batch_size=128] [--steps=3] [--rounds=3]

Both steps are compiled first; then the two alternate, `steps` steps per
timing, `rounds` times, and the median time per step of each is compared
(alternating keeps drifts of the machine out of the ratio). "Off" is the
bare step: loss, accuracy and the global gradient norm. Last column: one
call of the probe (`train.probe_step`, 256 images, dropout off; with batch
norm a training-mode and an eval-mode forward pass), which runs once per
logged step. Synthetic data (CIFAR-shaped, 32x32x3): this measures compute,
not the input pipeline.
"""

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cnn_lab import metrics, models, optim, train  # noqa: E402
from configs import resnet20, vgg16_bn, vgg16_nobn  # noqa: E402

CONFIGS = {'vgg16_bn': vgg16_bn, 'vgg16_nobn': vgg16_nobn,
           'resnet20': resnet20}


def build(config_name: str, batch_size: int):
  config = CONFIGS[config_name].get_config()
  model_cfg = {**config.model.to_dict(), 'num_classes': 10}
  model = models.create_model(**model_cfg)
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=1000)
  shape = (32, 32, 3)
  state = train.create_train_state(model, tx, shape, jax.random.key(0))
  sample = (model, {'params': state.params, 'batch_stats': state.batch_stats},
            jnp.zeros((1, *shape)))
  names = tuple(metrics.layer_order(*sample))
  sites = tuple(metrics.activation_sites(*sample))
  bn_layers = tuple(metrics.batch_norm_layers(*sample))
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.normal(size=(batch_size, *shape)).astype(np.float32),
      'label': rng.integers(0, 10, batch_size).astype(np.int32)})
  steps = {
      on: jax.jit(functools.partial(
          train.train_step, layer_names=names, activation_sites=sites,
          bn_layers=bn_layers, schedule=schedule, layer_stats=on),
      donate_argnums=(0,))
      for on in (False, True)}
  return state, batch, steps, len(names), len(sites)


def time_steps(step, state, batch, n: int):
  key = jax.random.key(1)
  start = time.perf_counter()
  for _ in range(n):
    state, scalars = step(state, batch, key)
  jax.block_until_ready((state, scalars))
  return state, (time.perf_counter() - start) / n, len(scalars)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='vgg16_bn,resnet20')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  names = args.models.split(',')
  unknown = [n for n in names if n not in CONFIGS]
  if unknown or args.steps < 1 or args.rounds < 1 or args.batch_size < 1:
    print(f'error: --models must be among {", ".join(CONFIGS)} and the '
          'counts positive', file=sys.stderr)
    return 2
  print(f'{jax.devices()[0].device_kind}, batch {args.batch_size}, '
        f'{args.rounds} rounds of {args.steps} steps each way', flush=True)
  rows = []
  for name in names:
    state, batch, steps, num_layers, num_sites = build(name, args.batch_size)
    num_keys = {}
    for on in (False, True):  # Compile, and one warm step.
      t = time.perf_counter()
      state, _, num_keys[on] = time_steps(steps[on], state, batch, 1)
      print(f'  {name}: compiled stats {"on" if on else "off"} in '
            f'{time.perf_counter() - t:.1f}s', flush=True)
    times = {False: [], True: []}
    for r in range(args.rounds):
      for on in ((False, True) if r % 2 == 0 else (True, False)):
        state, per_step, _ = time_steps(steps[on], state, batch, args.steps)
        times[on].append(per_step)
    off, on = (statistics.median(times[k]) for k in (False, True))
    # The probe: once per logged step, on 256 training images.
    probe = jax.jit(train.probe_step)
    probe_batch = {k: jnp.concatenate([v, v])[:256] for k, v in batch.items()}
    jax.block_until_ready(probe(state, probe_batch))
    probe_times = []
    for _ in range(args.rounds):
      t = time.perf_counter()
      jax.block_until_ready(probe(state, probe_batch))
      probe_times.append(time.perf_counter() - t)
    probe_time = statistics.median(probe_times)
    rows.append((name, num_layers, num_sites, num_keys[False],
                 num_keys[True], off, on, probe_time))
    print(f'  {name}: off {off * 1e3:.0f} ms/step, on {on * 1e3:.0f} '
          f'ms/step, ratio {on / off:.3f}; probe {probe_time * 1e3:.0f} ms',
          flush=True)

  print('\n| model | layers | activation sites | scalars off / on | '
        'ms/step off | ms/step on | on / off | probe ms (per log step) |')
  print('|---|---|---|---|---|---|---|---|')
  for name, nl, ns, k_off, k_on, off, on, probe_time in rows:
    print(f'| {name} | {nl} | {ns} | {k_off} / {k_on} | {off * 1e3:.0f} | '
          f'{on * 1e3:.0f} | {on / off:.3f} | {probe_time * 1e3:.0f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
