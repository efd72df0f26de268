r"""Which convolution path is fastest on this machine, per layer shape and
for whole training steps.

  .venv/bin/python experiments/conv_paths.py [--model=all|lenet5|resnet20|
      vgg16_bn] [--batch_size=128] [--impls=xla,im2col,shifted,fast]
      [--rounds=5] [--reps=4] [--min_seconds=0.2] [--no-steps] [--no-shapes]

Part 1, per shape: every distinct convolution of the model (found by
tracing it), at the batch size, for each impl of `cnn_lab.kernels.conv2d`
('fast' is what 'auto' takes on a CPU; a path triple forward/dx/dw, e.g.
xla/xla/matmul, runs `kernels.select.conv_paths`): the forward pass, forward +
input gradient (dx), and forward + dx + kernel gradient (dw), in GFLOP/s
of the dense count 2*N*Ho*Wo*kh*kw*ci*co per product (fwd+dx counts 2
products, fwd+dx+dw 3), and the paths that 'auto' takes on this backend.

Each jitted call runs the computation `reps` times, each repetition fed
from the last (so XLA can neither hoist nor drop work): in a training step
XLA allocates one block of scratch memory per call, and the kernel maps
fresh pages of it at their first touch (about 1.3 us per 4 KiB page
here), which one call per product would charge to each product. Calls
repeat for `min_seconds` per timing; variants alternate round by round;
medians of `rounds`. Part 1 isolates each convolution from its
neighbours, so it misses what they cost each other inside a step (XLA's
dw transposes its input, and in a step it re-runs the batch norm, ReLU
and residual sums that produced it inside that transpose): part 2 is the
measure that counts.

Part 2, whole steps: `cnn_lab.steps.train_step` (SGD with momentum, batch
norm in training mode, `layer_stats=False`) of each model's config at the
batch size, on a fixed synthetic batch, with `model.conv_impl` = 'auto'
as now, the previous 'auto' (im2col for inputs of at most 64 channels,
shifted matmuls for maps of at most 15 pixels, else XLA; all differentiated
by JAX) and 'xla'; images per second, medians of alternating rounds.
Where 'auto' takes XLA's paths for every layer (LeNet-5), 'auto' and 'xla'
compile to the same program and differ by noise alone.
"""

import argparse
import contextlib
import functools
import importlib
import os
import pathlib
import statistics
import sys
import time
from unittest import mock

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cnn_lab import kernels, metrics, models, optim  # noqa: E402
from cnn_lab import steps as steps_lib  # noqa: E402
from cnn_lab.kernels import select  # noqa: E402
from cnn_lab.kernels.geometry import conv_geometry  # noqa: E402

# Benchmark name: (config module, input shape HWC).
MODELS = {
    'lenet5': ('configs.lenet5', (28, 28, 1)),
    'resnet20': ('configs.resnet20', (32, 32, 3)),
    'vgg16_bn': ('configs.vgg16_bn', (32, 32, 3)),
}

# Steps per timing of part 2 (about half a second to a second each).
STEPS_PER_TIMING = {'lenet5': 60, 'resnet20': 2, 'vgg16_bn': 1}


def create_model(name: str, conv_impl: str):
  config = importlib.import_module(MODELS[name][0]).get_config()
  return config, models.create_model(**{
      **config.model.to_dict(), 'num_classes': 10, 'conv_impl': conv_impl})


def conv_shapes(name: str, batch_size: int) -> list[tuple]:
  """The distinct (x shape, kernel shape, strides, padding) of the model's
  convolutions, in order, found by tracing it."""
  found = []
  conv2d = kernels.conv2d

  def record(x, kernel, strides=(1, 1), padding='SAME', impl='auto'):
    pads, _ = conv_geometry(x.shape[1:3], kernel.shape[:2], tuple(strides),
                            padding)
    key = (x.shape, kernel.shape, tuple(strides), pads)
    if key not in found:
      found.append(key)
    return conv2d(x, kernel, strides, padding, impl)

  _, model = create_model(name, 'xla')
  x = jnp.zeros((batch_size, *MODELS[name][1]))
  with mock.patch.object(kernels, 'conv2d', record):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), x)
  return found


def conv_fn(impl: str):
  """conv2d(x, kernel, strides, pads) for an impl name or forward/dx/dw."""
  if '/' in impl:
    paths = tuple(impl.split('/'))
    return lambda x, k, s, p: select.conv_paths(x, k, s, p, paths)
  return lambda x, k, s, p: kernels.conv2d(x, k, s, p, impl)


def make_timed(impl: str, stage: str, shape, reps: int):
  """A jitted function of (x, kernel, dy) that runs `stage` ('fwd', 'dx',
  'dw': forward, + input gradient, + kernel gradient) `reps` times."""
  _, _, strides, pads = shape
  conv = conv_fn(impl)

  def once(x, k, dy):
    if stage == 'fwd':
      return [conv(x, k, strides, pads)]
    if stage == 'dx':
      y, vjp = jax.vjp(lambda a: conv(a, k, strides, pads), x)
      return [y, *vjp(dy)]
    y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, pads), x, k)
    return [y, *vjp(dy)]

  @jax.jit
  def loop(x, k, dy):
    # Unrolled (XLA compiles convolutions inside a while loop differently).
    # Every input depends on the carry (always 0), and the carry on every
    # output: no repetition can be merged with another or dropped.
    c = jnp.zeros((), x.dtype)
    for _ in range(reps):
      outs = once(x + c, k + c, dy + c)
      c = c + sum(jnp.sum(o.astype(jnp.float32)) for o in outs) * 0
    return c

  return loop


def time_calls(fn, args, min_seconds: float) -> float:
  """Seconds per call of `fn`, calling it for at least `min_seconds`."""
  calls, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(fn(*args))
    calls += 1
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return elapsed / calls


def bench_shapes(name: str, batch_size: int, impls, rounds: int,
                 reps: int, min_seconds: float) -> list[str]:
  rows = []
  backend = jax.default_backend()
  for shape in conv_shapes(name, batch_size):
    x_shape, k_shape, strides, pads = shape
    _, (out_h, out_w) = conv_geometry(x_shape[1:3], k_shape[:2], strides,
                                      pads)
    kh, kw, ci, co = k_shape
    flops = 2 * x_shape[0] * out_h * out_w * kh * kw * ci * co
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape)
    k = jax.random.normal(keys[1], k_shape) / np.sqrt(kh * kw * ci)
    dy = jax.random.normal(keys[2], (x_shape[0], out_h, out_w, co))
    fns = {(impl, stage): make_timed(impl, stage, shape, reps)
           for impl in impls for stage in ('fwd', 'dx', 'dw')}
    for fn in fns.values():  # Compile and warm up.
      jax.block_until_ready(fn(x, k, dy))
    times = {key: [] for key in fns}
    order = list(fns)
    for r in range(rounds):
      for key in (order if r % 2 == 0 else order[::-1]):
        times[key].append(
            time_calls(fns[key], (x, k, dy), min_seconds) / reps)
    products = {'fwd': 1, 'dx': 2, 'dw': 3}
    gflops = {key: products[key[1]] * flops / statistics.median(t) / 1e9
              for key, t in times.items()}
    auto = '/'.join(select.select_conv_paths(backend, x_shape, k_shape,
                                             strides, pads))
    pad = pads[0][0] if len(set(sum(pads, ()))) == 1 else pads
    label = (f'{x_shape[1]}x{x_shape[2]}x{ci}->{co} {kh}x{kw}/{strides[0]} '
             f'pad {pad}')
    cells = ' | '.join(
        ' / '.join(f'{gflops[impl, stage]:.0f}'
                   for stage in ('fwd', 'dx', 'dw')) for impl in impls)
    rows.append(f'| {name} | {label} | {flops / 1e9:.2f} | {cells} | '
                f'{auto} |')
    print(rows[-1], flush=True)
  return rows


@contextlib.contextmanager
def previous_auto():
  """conv2d with the routing of 'auto' before the custom-VJP paths: one
  impl per layer, differentiated by JAX."""
  conv2d = kernels.conv2d

  def old(x, kernel, strides=(1, 1), padding='SAME', impl='auto'):
    if impl == 'auto':
      kh, kw = kernel.shape[:2]
      _, (out_h, out_w) = conv_geometry(
          x.shape[1:3], (kh, kw), tuple(strides), padding)
      impl = 'xla'
      if kh * kw > 1 and out_h * out_w <= 15:
        impl = 'shifted'
      elif kh * kw > 1 and x.shape[-1] <= 64:
        impl = 'im2col'
    return conv2d(x, kernel, strides, padding, impl)

  with mock.patch.object(kernels, 'conv2d', old):
    yield


def build_step(name: str, variant: str, batch_size: int):
  """The compiled train step of `name` with conv_impl `variant` ('auto',
  'xla', ... or 'previous_auto'), its state and a synthetic batch."""
  impl = 'auto' if variant == 'previous_auto' else variant
  config, model = create_model(name, impl)
  shape = MODELS[name][1]
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=1000)
  state = steps_lib.create_train_state(model, tx, shape, jax.random.key(0))
  sample = (model, {'params': state.params, 'batch_stats': state.batch_stats},
            jnp.zeros((1, *shape)))
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.normal(size=(batch_size, *shape)).astype(np.float32),
      'label': rng.integers(0, 10, batch_size).astype(np.int32)})
  step = jax.jit(functools.partial(
      steps_lib.train_step, layer_names=tuple(metrics.layer_order(*sample)),
      schedule=schedule, layer_stats=False), donate_argnums=(0,))
  key = jax.random.key(1)
  with previous_auto() if variant == 'previous_auto' else (
      contextlib.nullcontext()):
    compiled = step.lower(state, batch, key).compile()
  return {'state': state, 'batch': batch, 'step': compiled, 'key': key}


def run_steps(case, n: int) -> float:
  start = time.perf_counter()
  state = case['state']
  for _ in range(n):
    state, scalars = case['step'](state, case['batch'], case['key'])
  jax.block_until_ready((state, scalars))
  case['state'] = state
  return (time.perf_counter() - start) / n


def bench_steps(name: str, batch_size: int, variants, rounds: int
                ) -> list[str]:
  cases = {}
  for variant in variants:
    start = time.perf_counter()
    cases[variant] = build_step(name, variant, batch_size)
    run_steps(cases[variant], 1)
    print(f'  {name} {variant}: compiled and warm in '
          f'{time.perf_counter() - start:.1f}s', flush=True)
  n = STEPS_PER_TIMING[name]
  times = {v: [] for v in variants}
  for r in range(rounds):
    for v in (variants if r % 2 == 0 else variants[::-1]):
      times[v].append(run_steps(cases[v], n))
  rates = {v: batch_size / statistics.median(t) for v, t in times.items()}
  row = ' | '.join(f'{rates[v]:.0f}' for v in variants)
  return [f'| {name} | {row} | {rates["auto"] / rates["xla"]:.2f} |']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='all',
                      choices=('all', *MODELS))
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--impls', default='xla,im2col,shifted,fast',
                      help='impl names or forward/dx/dw paths, comma-'
                      'separated')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--reps', type=int, default=4,
                      help='repetitions inside one jitted call (part 1)')
  parser.add_argument('--min_seconds', type=float, default=0.2,
                      help='length of one timing of part 1')
  parser.add_argument('--steps', action=argparse.BooleanOptionalAction,
                      default=True, help='part 2: whole train steps')
  parser.add_argument('--shapes', action=argparse.BooleanOptionalAction,
                      default=True, help='part 1: per-shape timings')
  args = parser.parse_args()
  names = list(MODELS) if args.model == 'all' else [args.model]
  impls = args.impls.split(',')
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, batch '
        f'{args.batch_size}, medians of {args.rounds} rounds', flush=True)
  if args.shapes:
    header = (f'\n| model | conv (input -> output channels, kernel/stride) | '
              f'GFLOP fwd | {" | ".join(impls)} | auto paths |')
    print(header + '\n|' + '---|' * (len(impls) + 4))
    print('(each impl: GFLOP/s of fwd / fwd+dx / fwd+dx+dw)')
    rows = [row for name in names for row in bench_shapes(
        name, args.batch_size, impls, args.rounds, args.reps,
        args.min_seconds)]
    print(header + '\n|' + '---|' * (len(impls) + 4) + '\n' + '\n'.join(rows))
  if args.steps:
    variants = ('xla', 'previous_auto', 'auto')
    rows = [row for name in names for row in bench_steps(
        name, args.batch_size, variants, args.rounds)]
    print(f'\n| model | img/s {" | img/s ".join(variants)} | auto / xla |')
    print('|---|---|---|---|---|\n' + '\n'.join(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
