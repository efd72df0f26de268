"""The benchmark behind `python -m cnn_lab.bench` (see __main__.py).

Each measurement is a callable `run(n)` that does `n` training steps and
waits for them; `time_alternating` calls the variants of one model in turn,
round after round, so that a drift of the machine (another process, the
clock) spreads over all of them instead of biasing one.
"""

import dataclasses
import functools
import importlib
import math
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnn_lab import metrics, models, optim, summary
from cnn_lab import steps as steps_lib

# Benchmark name: (config module, input shape HWC, classes).
MODELS = {
    'lenet5': ('configs.lenet5', (28, 28, 1), 10),
    'resnet20': ('configs.resnet20', (32, 32, 3), 10),
    'vgg16_bn': ('configs.vgg16_bn', (32, 32, 3), 10),
    'resnet50': ('configs.resnet50', (224, 224, 3), 1000),
}

# Cost of a training step per image, in units of one forward pass's
# multiply-accumulates: the forward pass, the input gradient and the weight
# gradient each take one product per MAC, at 2 FLOPs each.
TRAIN_FLOPS_PER_MAC = 6


def train_flops_per_image(model, input_shape) -> int:
  """Dense FLOPs of one training step per image: 6 per multiply-accumulate
  of the convolution and dense layers (summary.summarize counts those)."""
  macs = sum(row.macs for row in summary.summarize(model, input_shape))
  return TRAIN_FLOPS_PER_MAC * macs


def matmul_peak(dtype=jnp.float32, n: int = 2048, seconds: float = 1.0
                ) -> float:
  """GFLOP/s of an n x n matmul on the default device: the yardstick for
  the models' achieved GFLOP/s (best of a few timed batches of calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  f(a, b).block_until_ready()
  reps = max(1, int(seconds / 5 / max(time.perf_counter() - t, 1e-6)))
  best = math.inf
  for _ in range(5):
    t = time.perf_counter()
    out = [f(a, b) for _ in range(reps)]
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best / 1e9


def time_alternating(runs: dict[str, Callable[[int], None]], rounds: int,
                     min_seconds: float, progress=None) -> dict[str, float]:
  """Median seconds per step of each `runs[label](n)` over the rounds of
  `time_rounds`."""
  return medians(time_rounds(runs, rounds, min_seconds, progress))


def medians(per_round: dict[str, list[float]]) -> dict[str, float]:
  """Each variant's median over the rounds of `time_rounds`."""
  return {label: statistics.median(t) for label, t in per_round.items()}


def time_rounds(runs: dict[str, Callable[[int], None]], rounds: int,
                min_seconds: float, progress=None) -> dict[str, list[float]]:
  """Seconds per step of each `runs[label](n)` (n steps, waited for), one
  number per round.

  First two warm steps each, the second of which sizes n so that one timing
  lasts about `min_seconds`; then `rounds` rounds in which every variant is
  timed once, in an order that reverses from round to round. Each timing
  follows one untimed step of the same variant: the first step after
  another variant ran is slow (ResNet-20 after PyTorch: 580-850 ms against
  410-440), and with n of 2 or 3 it would weigh on the variant that
  happens to follow the other framework.
  """
  steps = {}
  for label, run in runs.items():
    run(1)
    t = time.perf_counter()
    run(1)
    steps[label] = max(1, min(50, round(min_seconds /
                                        (time.perf_counter() - t))))
  times = {label: [] for label in runs}
  labels = list(runs)
  for r in range(rounds):
    for label in (labels if r % 2 == 0 else labels[::-1]):
      runs[label](1)
      t = time.perf_counter()
      runs[label](steps[label])
      times[label].append((time.perf_counter() - t) / steps[label])
    if progress:
      progress(f'round {r + 1}/{rounds}: ' + ', '.join(
          f'{label} {times[label][-1] * 1e3:.1f} ms' for label in labels))
  return times


@dataclasses.dataclass
class FlaxCase:
  """One model's jitted train steps (statistics off and on), compiled."""
  runs: dict[str, Callable[[int], None]]  # 'off', 'on', 'probe'.
  compile_seconds: dict[str, float]
  peak_bytes: dict[str, int]  # XLA's estimate for each compiled step.
  flops_per_image: int
  num_params: int


def _peak_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased (donated) buffers, from
  XLA's memory analysis of a compiled step; None where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def build_flax(name: str, batch_size: int, dtype: str = 'float32',
               conv_impl: str | None = None) -> FlaxCase:
  """The train step of benchmark model `name` as cnn_lab runs it (its
  config's model and optimiser, batch norm in training mode), on a fixed
  synthetic batch: this times compute, not data."""
  module, shape, num_classes = MODELS[name]
  config = importlib.import_module(module).get_config()
  model_cfg = {**config.model.to_dict(), 'num_classes': num_classes,
               'dtype': dtype}
  if conv_impl:
    model_cfg['conv_impl'] = conv_impl
  model = models.create_model(**model_cfg)
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=1000)
  state = steps_lib.create_train_state(model, tx, shape, jax.random.key(0))
  sample = (model, {'params': state.params, 'batch_stats': state.batch_stats},
            jnp.zeros((1, *shape)))
  names = tuple(metrics.layer_order(*sample))
  sites = tuple(metrics.activation_sites(*sample))
  bn_layers = tuple(metrics.batch_norm_layers(*sample))
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.normal(size=(batch_size, *shape)).astype(np.float32),
      'label': rng.integers(0, num_classes, batch_size).astype(np.int32)})
  key = jax.random.key(1)
  holder = {'state': state}
  runs, compile_seconds, peak = {}, {}, {}
  for label, on in (('off', False), ('on', True)):
    step = jax.jit(functools.partial(
        steps_lib.train_step, layer_names=names, activation_sites=sites,
        bn_layers=bn_layers, schedule=schedule, layer_stats=on),
                   donate_argnums=(0,))
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_seconds[label] = time.perf_counter() - t
    peak[label] = _peak_bytes(compiled)

    def run(n, compiled=compiled):
      for _ in range(n):
        holder['state'], scalars = compiled(holder['state'], batch, key)
      jax.block_until_ready((holder['state'], scalars))
    runs[label] = run

  # The probe: once per logged step, on 256 training images.
  probe_batch = {k: jnp.concatenate([v] * math.ceil(256 / batch_size))[:256]
                 for k, v in batch.items()}
  t = time.perf_counter()
  probe = jax.jit(steps_lib.probe_step).lower(state, probe_batch).compile()
  compile_seconds['probe'] = time.perf_counter() - t
  runs['probe'] = lambda n: [
      jax.block_until_ready(probe(holder['state'], probe_batch))
      for _ in range(n)]
  num_params = sum(int(np.prod(p.shape))
                   for p in jax.tree.leaves(state.params))
  return FlaxCase(runs, compile_seconds, peak,
                  train_flops_per_image(model, shape), num_params)


def build_torch(name: str, batch_size: int, dtype: str = 'float32'
                ) -> tuple[dict[str, Callable[[int], None]], int]:
  """PyTorch twins (cnn_lab.bench.torch_models) of benchmark model `name`,
  eager, trained with SGD with momentum 0.9 and weight decay like the
  config's, one step = zero_grad, forward, cross-entropy, backward, step.
  Two runs: 'channels_last' and 'contiguous' memory format. On CUDA (when
  JAX is on a GPU too) and dtype bfloat16, under autocast."""
  import torch  # pylint: disable=import-outside-toplevel
  from cnn_lab.bench import torch_models  # pylint: disable=import-outside-toplevel

  module, _, _ = MODELS[name]
  config = importlib.import_module(module).get_config()
  device = 'cuda' if (jax.default_backend() == 'gpu'
                      and torch.cuda.is_available()) else 'cpu'
  runs = {}
  num_params = 0
  for fmt in ('channels_last', 'contiguous'):
    torch.manual_seed(0)
    model, shape, num_classes = torch_models.build(name)
    num_params = sum(p.numel() for p in model.parameters())
    memory_format = (torch.channels_last if fmt == 'channels_last'
                     else torch.contiguous_format)
    model = model.to(device=device, memory_format=memory_format).train()
    x = torch.randn(batch_size, *shape, device=device).contiguous(
        memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                          weight_decay=config.optim.get('weight_decay', 0.0))
    autocast = (dtype == 'bfloat16')

    def run(n, model=model, x=x, y=y, opt=opt):
      for _ in range(n):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
          loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
      if device == 'cuda':
        torch.cuda.synchronize()
      else:
        loss.item()
    runs[fmt] = run
  return runs, num_params


def pipeline_rate(name: str, batch_size: int, seconds: float = 1.0
                  ) -> tuple[float | None, str]:
  """Images per second of cnn_lab's input pipeline (one thread, as the
  training loop's prefetcher runs it) building training batches of real
  Fashion-MNIST at model `name`'s input size, with its config's
  augmentation; (None, reason) where the dataset cannot be loaded."""
  from cnn_lab.errors import ConfigError  # pylint: disable=import-outside-toplevel

  module, shape, _ = MODELS[name]
  config = importlib.import_module(module).get_config()
  try:
    ds = _fashion_mnist(shape[0], bool(config.data.random_crop),
                        bool(config.data.random_flip))
  except ImportError as e:
    return None, f'n/a ({e.name} not installed)'
  except ConfigError as e:
    return None, f'n/a ({str(e).splitlines()[0]})'
  ds.train.train_batch(0, batch_size, seed=0)  # Warm: first permutation.
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds or n < 2:
    ds.train.train_batch(n + 1, batch_size, seed=0)
    n += 1
  rate = n * batch_size / (time.perf_counter() - t)
  aug = [a for a, on in (('crop', config.data.random_crop),
                         ('flip', config.data.random_flip)) if on]
  return rate, (f'Fashion-MNIST {shape[0]}x{shape[1]}x1'
                + (f' +{"+".join(aug)}' if aug else ''))


@functools.lru_cache(maxsize=None)
def _fashion_mnist(size: int, crop: bool, flip: bool):
  from cnn_lab import data as data_lib  # pylint: disable=import-outside-toplevel
  return data_lib.make_datasets(dataset='fashion_mnist', image_size=size,
                                random_crop=crop, random_flip=flip)


def machine_description() -> str:
  """'<CPU model> (<widest vector unit>), <n> cores' or the accelerator's
  kind, for the table. (Machines named alike differ: this project's 2-core
  'AMD EPYC' has been both an AVX-512 and an AVX2 one.)"""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return f'{device.device_kind} ({device.platform}), {jax.device_count()} device(s)'
  cpu = platform.processor() or platform.machine()
  flags = set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
        elif line.startswith('flags'):
          flags = set(line.split(':', 1)[1].split())
          break
  except OSError:
    pass
  vector = ('AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags
            else None)
  if vector:
    cpu = f'{cpu} ({vector})'
  return f'{cpu}, {len(os.sched_getaffinity(0))} cores'


def check_args(parser, args, positive_ints) -> None:
  """The checks the bench commands share: --models names known models
  (turned into a list), the `positive_ints` flags are >= 1, --min_seconds
  is positive; else parser.error (one line, exit 2)."""
  args.models = [m for m in args.models.split(',') if m]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    parser.error(f'--models: unknown {", ".join(unknown) or "(none given)"};'
                 f' choose among {", ".join(MODELS)}')
  for flag in positive_ints:
    if getattr(args, flag) < 1:
      parser.error(f'--{flag}={getattr(args, flag)} must be at least 1')
  if not args.min_seconds > 0:
    parser.error(f'--min_seconds={args.min_seconds} must be positive')
