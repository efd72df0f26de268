r"""K seeds in one vmapped program against K runs one after another.

  python -m cnn_lab.bench.seeds [--models=lenet5,resnet20] [--k=8]
      [--rounds=3] [--batch_size=128] [--min_seconds=1] [--out=runs/bench]
      [--vmap_method=broadcast_all|sequential]

For each model, the train step as `launch.py` runs it (the model's config,
its optimiser, batch norm in training mode) on K train states made from
seeds 0 ... K-1, each with its own fixed synthetic batch and dropout key
(this times compute, not data): "separate" is the single-run step, taken
once for each seed in turn, as K runs one after another take it; "vmapped"
is the step of `cnn_lab.seed_group`, all K seeds in one call. Both
versions of the step are timed: statistics off (the bare step, which a
run takes between logged steps once it has `train.MIN_UNLOGGED_STEPS`
of them) and on (logged steps); the four alternate in one process, round
after round, their order reversed every round (`suite.time_rounds`), and
the table gives medians. ratio = separate time / vmapped time for the K
seeds (above 1: the group is faster), with the lowest and highest ratio
of one round in brackets; "at log 50" weighs 49 steps off against one on,
as a run logging every 50 steps does. "CPU ms" is the process's CPU time
(all its threads) per step of the K seeds, the median over each variant's
calls after its two warm ones: the work done, where the wall-clock time
also counts waiting. Compile times: the single-run step
(each separate run compiles it once) and the vmapped one. --vmap_method:
how oneDNN's convolutions are vmapped (kernels/onednn.py's VMAP_METHOD:
one call for the stacked seeds, or a loop of single calls).

Writes <out>/seeds.md (the table) and <out>/seeds.json (every number, every
round), after each model. Exit status 2 with one line for bad flags.
"""

import datetime
import functools
import importlib
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
if __name__ == '__main__':
  # Before JAX starts: the allocator launch.py runs on (cnn_lab/malloc.py).
  from cnn_lab.malloc import reexec_with_fast_malloc
  reexec_with_fast_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cnn_lab import malloc, metrics, models, optim, seed_group  # noqa: E402
from cnn_lab import steps as steps_lib  # noqa: E402
from cnn_lab.bench import suite  # noqa: E402
from cnn_lab.kernels import onednn  # noqa: E402
from cnn_lab.errors import ArgumentParser  # noqa: E402

VARIANTS = ('off', 'on')  # Statistics off (unlogged steps) and on.
LOG_EVERY = 50  # configs/base.py's log_every_steps, for the weighted ratio.


def parse_args(argv):
  parser = ArgumentParser(prog='python -m cnn_lab.bench.seeds',
                          description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--models', default='lenet5,resnet20',
                      help=f'comma-separated, among {", ".join(suite.MODELS)}')
  parser.add_argument('--k', type=int, default=8, help='seeds in the group')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--min_seconds', type=float, default=1.0,
                      help='length of one timing')
  parser.add_argument('--out', default='runs/bench')
  parser.add_argument('--vmap_method', default=onednn.VMAP_METHOD,
                      choices=('broadcast_all', 'sequential'),
                      help="how oneDNN's convolutions are vmapped")
  args = parser.parse_args(argv)
  suite.check_args(parser, args, ('k', 'batch_size', 'rounds'))
  try:
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    parser.error(f'--out={args.out}: cannot write there ({e.strerror})')
  return args


def build_case(name: str, k: int, batch_size: int):
  """(runs, compile seconds, XLA's peak bytes) of benchmark model `name`:
  runs['separate off'](n) takes n single-run steps of each of the k seeds
  in turn, runs['vmapped off'](n) n vmapped steps of all k; 'on' the same
  with statistics."""
  module, shape, num_classes = suite.MODELS[name]
  config = importlib.import_module(module).get_config()
  model = models.create_model(**{**config.model.to_dict(),
                                 'num_classes': num_classes})
  tx, schedule = optim.make_optimizer(**config.optim, num_steps=1000)
  states = [steps_lib.create_train_state(model, tx, shape, jax.random.key(s))
            for s in range(k)]
  sample = (model, {'params': states[0].params,
                    'batch_stats': states[0].batch_stats},
            jnp.zeros((1, *shape)))
  names = dict(layer_names=tuple(metrics.layer_order(*sample)),
               activation_sites=tuple(metrics.activation_sites(*sample)),
               bn_layers=tuple(metrics.batch_norm_layers(*sample)))
  rng = np.random.default_rng(0)
  batches = [jax.device_put({
      'image': rng.normal(size=(batch_size, *shape)).astype(np.float32),
      'label': rng.integers(0, num_classes, batch_size).astype(np.int32)})
             for _ in range(k)]
  keys = [jax.random.key(1000 + s) for s in range(k)]
  group = {'state': seed_group.stack(states),
           'batch': seed_group.stack(batches), 'keys': jnp.stack(keys)}
  runs, compile_seconds, peak = {}, {}, {}
  for variant in VARIANTS:
    fn = functools.partial(steps_lib.train_step, **names, schedule=schedule,
                           layer_stats=variant == 'on')
    single = jax.jit(fn, donate_argnums=(0,))
    vmapped = jax.jit(jax.vmap(
        functools.partial(fn, seed_axis=seed_group.SEED_AXIS),
        axis_name=seed_group.SEED_AXIS), donate_argnums=(0,))
    for label, jitted, args in (
        ('separate', single, (states[0], batches[0], keys[0])),
        ('vmapped', vmapped, (group['state'], group['batch'],
                              group['keys']))):
      t = time.perf_counter()
      compiled = jitted.lower(*args).compile()
      compile_seconds[f'{label} {variant}'] = time.perf_counter() - t
      peak[f'{label} {variant}'] = suite._peak_bytes(compiled)
      # Each run its own copy of the states, which its steps donate.
      runs[f'{label} {variant}'] = (
          _separate_runs(compiled, jax.tree.map(jnp.copy, states), batches,
                         keys)
          if label == 'separate' else _vmapped_runs(
              compiled, {**group, 'state': jax.tree.map(jnp.copy,
                                                        group['state'])}))
  return runs, compile_seconds, peak


def _separate_runs(compiled, states, batches, keys):
  holder = list(states)

  def run(n):
    for _ in range(n):
      for i, (batch, key) in enumerate(zip(batches, keys)):
        holder[i], scalars = compiled(holder[i], batch, key)
    jax.block_until_ready((holder, scalars))
  return run


def _vmapped_runs(compiled, group):
  holder = {'state': group['state']}

  def run(n):
    for _ in range(n):
      holder['state'], scalars = compiled(holder['state'], group['batch'],
                                          group['keys'])
    jax.block_until_ready((holder['state'], scalars))
  return run


def with_cpu_time(runs: dict, clock=time.process_time):
  """`runs` wrapped to record each call's (steps, CPU seconds) in the
  returned dict of lists."""
  calls = {label: [] for label in runs}

  def wrap(label, run):
    def timed(n):
      t = clock()
      run(n)
      calls[label].append((n, clock() - t))
    return timed
  return {label: wrap(label, run) for label, run in runs.items()}, calls


def summarize(per_round: dict[str, list[float]], k: int,
              cpu_calls: dict[str, list] | None = None) -> dict:
  """The medians of `suite.time_rounds` (seconds per call: k steps of the
  separate runs, one of the group) as ms per step of all k seeds, and the
  ratios separate / vmapped: of the medians, per round, and weighted as a
  run logging every LOG_EVERY steps; with `cpu_calls` (`with_cpu_time`),
  the median CPU ms per step over the calls after the two warm ones."""
  med = suite.medians(per_round)
  out = {'ms_per_step_of_k_seeds': {v: med[v] * 1e3 for v in med},
         'ratio': {}, 'ratio_per_round': {}}
  if cpu_calls:
    out['cpu_ms_per_step_of_k_seeds'] = {
        label: statistics.median(s / n for n, s in calls[2:]) * 1e3
        for label, calls in cpu_calls.items()}
  for variant in VARIANTS:
    sep, vm = f'separate {variant}', f'vmapped {variant}'
    out['ratio'][variant] = med[sep] / med[vm]
    out['ratio_per_round'][variant] = [
        s / v for s, v in zip(per_round[sep], per_round[vm])]
  weigh = lambda label: (LOG_EVERY - 1) * med[f'{label} off'] + med[
      f'{label} on']
  out['ratio']['at_log_50'] = weigh('separate') / weigh('vmapped')
  out['ms_per_step_per_seed'] = {v: ms / k for v, ms in
                                 out['ms_per_step_of_k_seeds'].items()}
  return out


def measure_model(name: str, args, log) -> dict:
  _, shape, _ = suite.MODELS[name]
  log(f'{name}: {args.k} seeds, batch {args.batch_size} of '
      f'{"x".join(map(str, shape))}, compiling')
  runs, compile_seconds, peak = build_case(name, args.k, args.batch_size)
  log(f'{name}: compiled ' + ', '.join(
      f'{label} {s:.1f}s' for label, s in compile_seconds.items()))
  runs, cpu_calls = with_cpu_time(runs)
  per_round = suite.time_rounds(runs, args.rounds, args.min_seconds,
                                lambda line: log(f'{name}: {line}'))
  result = {'model': name, 'k': args.k, 'batch': args.batch_size,
            'input': list(shape), 'compile_seconds': compile_seconds,
            'peak_mib_xla_estimate': {
                label: None if b is None else b / 2 ** 20
                for label, b in peak.items()},
            **summarize(per_round, args.k, cpu_calls),
            'seconds_per_round': per_round}
  log(f'{name}: ratio {result["ratio"]["off"]:.2f} (statistics off), '
      f'{result["ratio"]["on"]:.2f} (on)')
  return result


def _ratio(result, variant: str) -> str:
  rounds = result['ratio_per_round'][variant]
  text = f'**{result["ratio"][variant]:.2f}**'
  if len(rounds) > 1:
    text += f' ({min(rounds):.2f}-{max(rounds):.2f})'
  return text


def format_markdown(header: dict, results: list[dict]) -> str:
  lines = [
      f'Machine: {header["machine"]}; JAX {header["jax"]} '
      f'({header["backend"]}); XLA_FLAGS={header["xla_flags"]}; malloc: '
      f'{header["malloc"]}; oneDNN under vmap: {header["vmap_method"]}; '
      f'float32, synthetic batches; {header["rounds"]} rounds; '
      f'{header["date"]}.', '',
      '| model | seeds, batch | separate ms (stats off / on) | vmapped ms '
      '(off / on) | ratio, stats off | ratio, stats on | ratio at log 50 | '
      'CPU ms, stats off: separate / vmapped | compile s: single step (off '
      '/ on) | vmapped (off / on) | peak MiB, XLA est.: single / vmapped '
      '(off) |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ms, c, p = (r['ms_per_step_of_k_seeds'], r['compile_seconds'],
                r['peak_mib_xla_estimate'])
    cpu = r.get('cpu_ms_per_step_of_k_seeds')
    lines.append(' | '.join([
        f'| {r["model"]}', f'{r["k"]}, {r["batch"]}',
        f'{ms["separate off"]:,.1f} / {ms["separate on"]:,.1f}',
        f'{ms["vmapped off"]:,.1f} / {ms["vmapped on"]:,.1f}',
        _ratio(r, 'off'), _ratio(r, 'on'), f'{r["ratio"]["at_log_50"]:.2f}',
        ' / '.join(f'{cpu[f"{label} off"]:,.1f}' if cpu else 'n/a'
                   for label in ('separate', 'vmapped')),
        f'{c["separate off"]:.1f} / {c["separate on"]:.1f}',
        f'{c["vmapped off"]:.1f} / {c["vmapped on"]:.1f}',
        ' / '.join('n/a' if p[f'{label} off'] is None
                   else f'{p[f"{label} off"]:,.0f}'
                   for label in ('separate', 'vmapped'))]) + ' |')
  lines += ['', 'ms: one step of all the seeds (separate: one step of each '
            'seed in turn).']
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  onednn.VMAP_METHOD = args.vmap_method
  log = lambda line: print(f'[bench.seeds] {line}', flush=True)
  header = {
      'machine': suite.machine_description(), 'jax': jax.__version__,
      'backend': jax.default_backend(), 'rounds': args.rounds,
      'date': datetime.date.today().isoformat(),
      'command': 'python -m cnn_lab.bench.seeds ' + ' '.join(argv),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'malloc': malloc.describe(), 'vmap_method': args.vmap_method}
  out = pathlib.Path(args.out)
  results = []
  for name in args.models:
    results.append(measure_model(name, args, log))
    table = format_markdown(header, results)
    (out / 'seeds.md').write_text(table)
    (out / 'seeds.json').write_text(json.dumps(
        {'header': header, 'results': results}, indent=1))
  print(table, end='')
  log(f'wrote {out / "seeds.md"} and {out / "seeds.json"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
