r"""Training-step speed of cnn_lab's models, optionally against PyTorch.

  python -m cnn_lab.bench [--vs-torch] [--models=lenet5,resnet20,vgg16_bn,resnet50]
      [--batch_size=128] [--resnet50_batch=16] [--dtype=float32|bfloat16]
      [--rounds=5] [--min_seconds=1] [--out=runs/bench] [--no-pipeline]

For each model, the full training step as `launch.py` runs it (the model's
config: SGD with momentum, weight decay, batch norm in training mode) on a
fixed synthetic batch: compile time, XLA's peak-memory estimate, images per
second with per-layer statistics off (the bare step) and on, the probe's
time (once per logged step), and the achieved GFLOP/s (dense count: 6 FLOPs
per multiply-accumulate of the forward pass) as a fraction of the n x n
matmul peak measured first. With --vs-torch, PyTorch twins of the models
(cnn_lab.bench.torch_models, eager, contiguous and channels_last) run in the
same process, alternating with the Flax steps round by round; the table
takes the faster PyTorch format, and ratio = cnn_lab img/s / PyTorch img/s
(of the medians over the rounds; in brackets the lowest and highest ratio
of one round's two timings, which shows how far the machine's speed
drifted while it ran).
The input pipeline column is cnn_lab's data pipeline building training
batches of real Fashion-MNIST at the model's input size (one thread, as in
training): if it is below the step's img/s, training waits on data.

Writes <out>/bench.md (the table) and <out>/bench.json (every number),
after each model. Exit status 2 with one line for bad flags.
"""

import datetime
import json
import os
import pathlib
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
if __name__ == '__main__':
  # Before JAX starts: the allocator launch.py runs on (cnn_lab/malloc.py).
  from cnn_lab.malloc import reexec_with_fast_malloc
  reexec_with_fast_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnn_lab import kernels, malloc  # noqa: E402
from cnn_lab.kernels import onednn, select  # noqa: E402
from cnn_lab.bench import suite  # noqa: E402
from cnn_lab.errors import ArgumentParser  # noqa: E402


def parse_args(argv):
  parser = ArgumentParser(
      prog='python -m cnn_lab.bench',
      description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--models', default='lenet5,resnet20,vgg16_bn,resnet50',
                      help=f'comma-separated, among {", ".join(suite.MODELS)}')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--resnet50_batch', type=int, default=16,
                      help='batch of resnet50 (224x224x3)')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--conv_impl', default=None,
                      choices=kernels.CONV_IMPLS,
                      help='override the configs\' model.conv_impl')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--min_seconds', type=float, default=1.0,
                      help='length of one timing')
  parser.add_argument('--vs-torch', dest='vs_torch', action='store_true')
  parser.add_argument('--no-pipeline', dest='pipeline', action='store_false')
  parser.add_argument('--out', default='runs/bench')
  args = parser.parse_args(argv)
  suite.check_args(parser, args, ('batch_size', 'resnet50_batch', 'rounds'))
  if args.vs_torch:
    try:
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      parser.error("--vs-torch needs PyTorch: pip install -e '.[bench]' "
                   '(torch==2.13.0, the CPU build)')
  out = pathlib.Path(args.out)
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / '.write-test'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    parser.error(f'--out={args.out}: cannot write there ({e.strerror})')
  return args


def _mib(n):
  return None if n is None else n / 2 ** 20


def measure_model(name, args, peak_gflops, log):
  _, shape, _ = suite.MODELS[name]
  batch = args.resnet50_batch if name == 'resnet50' else args.batch_size
  log(f'{name}: batch {batch} of {"x".join(map(str, shape))}, compiling')
  case = suite.build_flax(name, batch, args.dtype, args.conv_impl)
  log(f'{name}: compiled in {case.compile_seconds["off"]:.1f}s (statistics '
      f'off), {case.compile_seconds["on"]:.1f}s (on)')
  runs = {'cnn_lab': case.runs['off'], 'cnn_lab+stats': case.runs['on']}
  torch_params = None
  if args.vs_torch:
    torch_runs, torch_params = suite.build_torch(name, batch, args.dtype)
    runs.update({f'torch {fmt}': run for fmt, run in torch_runs.items()})
  per_round = suite.time_rounds(runs, args.rounds, args.min_seconds,
                                lambda line: log(f'{name}: {line}'))
  seconds = suite.medians(per_round)
  # One timed call after a warm one: at 224x224 a probe takes many seconds.
  probe = suite.time_alternating({'probe': case.runs['probe']}, 1,
                                 args.min_seconds / 2)['probe']
  off = seconds['cnn_lab']
  result = {
      'model': name, 'batch': batch, 'input': list(shape),
      'dtype': args.dtype, 'params': case.num_params,
      'train_flops_per_image': case.flops_per_image,
      'compile_seconds': case.compile_seconds,
      'peak_mib_xla_estimate': {k: _mib(v) for k, v in case.peak_bytes.items()},
      'ms_per_step': {'off': off * 1e3, 'on': seconds['cnn_lab+stats'] * 1e3,
                      'probe': probe * 1e3},
      'images_per_second': batch / off,
      'images_per_second_stats_on': batch / seconds['cnn_lab+stats'],
      'stats_cost': seconds['cnn_lab+stats'] / off,
      'gflops': case.flops_per_image * batch / off / 1e9,
  }
  result['fraction_of_matmul_peak'] = result['gflops'] / peak_gflops
  if args.vs_torch:
    fmt = min(('channels_last', 'contiguous'),
              key=lambda f: seconds[f'torch {f}'])
    torch_s = seconds[f'torch {fmt}']
    result['torch'] = {
        'params': torch_params,
        'ms_per_step': {f: seconds[f'torch {f}'] * 1e3
                        for f in ('channels_last', 'contiguous')},
        'format': fmt, 'images_per_second': batch / torch_s,
        'gflops': case.flops_per_image * batch / torch_s / 1e9}
    result['ratio_vs_torch'] = torch_s / off
    # Each round timed both frameworks within seconds of each other: the
    # spread of their ratio shows how much the machine drifted.
    result['ratio_per_round'] = [
        t / f for t, f in zip(per_round[f'torch {fmt}'],
                              per_round['cnn_lab'])]
    result['ms_per_round'] = {label: [t * 1e3 for t in times]
                              for label, times in per_round.items()}
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:  # Process-wide, so far.
      result['device_peak_mib_so_far'] = _mib(stats['peak_bytes_in_use'])
  if args.pipeline:
    rate, source = suite.pipeline_rate(name, batch, args.min_seconds)
    result['pipeline'] = {'images_per_second': rate, 'source': source}
  log(f'{name}: {result["images_per_second"]:,.0f} img/s'
      + (f', PyTorch {result["torch"]["images_per_second"]:,.0f} img/s '
         f'({result["torch"]["format"]}), ratio '
         + _ratio(result, bold=False) if args.vs_torch else ''))
  return result


def _num(x, digits=0):
  return 'n/a' if x is None else f'{x:,.{digits}f}'


def _rate(x):
  """Images per second: whole numbers from 100 up, else 3 digits."""
  return f'{x:,.0f}' if x >= 100 else f'{x:.3g}'


def _ratio(result, bold: bool = True) -> str:
  """The ratio of medians, and the range of the per-round ratios."""
  text = f'{result["ratio_vs_torch"]:.2f}'
  if bold:
    text = f'**{text}**'
  rounds = result.get('ratio_per_round') or []
  if len(rounds) > 1:
    text += f' ({min(rounds):.2f}-{max(rounds):.2f})'
  return text


def format_markdown(header: dict, results: list[dict]) -> str:
  lines = [
      f'Machine: {header["machine"]}; JAX {header["jax"]} '
      f'({header["backend"]})'
      + (f', PyTorch {header["torch"]}' if header.get('torch') else '')
      + (f'; XLA_FLAGS={header["xla_flags"]}' if header.get('xla_flags')
         else '')
      + (f'; convolutions: {header["convolutions"]}'
         if header.get('convolutions') else '')
      + (f'; malloc: {header["malloc"]}' if header.get('malloc') else '')
      + f'; {header["dtype"]}; {header["matmul"]} matmul peak '
      f'{header["matmul_peak_gflops"]:.0f} GFLOP/s; {header["date"]}.', '',
      '| model | input, batch | params | train GFLOP/img | compile s '
      '(stats off / on) | peak MiB (XLA est.) | img/s | GFLOP/s (of peak) '
      '| stats on: img/s (cost) | probe ms | PyTorch img/s (format) | ratio '
      '(per-round range) | input pipeline img/s |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    torch = r.get('torch')
    pipe = r.get('pipeline')
    peak = r['peak_mib_xla_estimate']
    lines.append(' | '.join([
        f'| {r["model"]}',
        f'{"x".join(map(str, r["input"]))}, {r["batch"]}',
        f'{r["params"]:,}',
        f'{r["train_flops_per_image"] / 1e9:.3g}',
        f'{r["compile_seconds"]["off"]:.1f} / {r["compile_seconds"]["on"]:.1f}',
        f'{_num(peak["off"])} / {_num(peak["on"])}',
        f'**{_rate(r["images_per_second"])}**',
        f'{r["gflops"]:.0f} ({r["fraction_of_matmul_peak"]:.0%})',
        f'{_rate(r["images_per_second_stats_on"])} ({r["stats_cost"]:.2f}x)',
        f'{r["ms_per_step"]["probe"]:.0f}',
        (f'{_rate(torch["images_per_second"])} ({torch["format"]})'
         if torch else '-'),
        _ratio(r) if torch else '-',
        (f'{_rate(pipe["images_per_second"])} ({pipe["source"]})'
         if pipe and pipe['images_per_second'] is not None
         else (pipe['source'] if pipe else '-')),
    ]) + ' |')
  return '\n'.join(lines) + '\n'


def _convolutions(args) -> str:
  """Which convolution paths the Flax steps take, in a few words."""
  if args.conv_impl not in (None, 'auto', 'fast'):
    return f'conv_impl={args.conv_impl}'
  if jax.default_backend() != 'cpu' and args.conv_impl != 'fast':
    return 'XLA\'s'
  if args.dtype == 'float32' and onednn.available():
    return (f'oneDNN below {select.ONEDNN_MAX_CHANNELS} channels, '
            'cnn_lab\'s paths above')
  why = 'bfloat16' if args.dtype != 'float32' else 'oneDNN not available'
  return f'cnn_lab\'s paths ({why})'


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  log = lambda line: print(f'[bench] {line}', flush=True)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  header = {
      'machine': suite.machine_description(), 'jax': jax.__version__,
      'backend': jax.default_backend(), 'dtype': args.dtype,
      'date': datetime.date.today().isoformat(),
      'command': 'python -m cnn_lab.bench ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      'matmul': '2048x2048 ' + args.dtype,
      # As cnn_lab set them on import (cnn_lab/xla_flags.py) or the user.
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'convolutions': _convolutions(args),
      # Both frameworks' (one process): cnn_lab/malloc.py.
      'malloc': malloc.describe(),
  }
  if args.vs_torch:
    import torch  # pylint: disable=import-outside-toplevel
    header['torch'] = torch.__version__
    header['torch_threads'] = torch.get_num_threads()
  log(f'{header["machine"]}: measuring the matmul peak')
  header['matmul_peak_gflops'] = suite.matmul_peak(dtype)
  log(f'matmul peak {header["matmul_peak_gflops"]:.0f} GFLOP/s')
  out = pathlib.Path(args.out)
  results = []
  for name in args.models:
    results.append(measure_model(name, args, header['matmul_peak_gflops'],
                                 log))
    table = format_markdown(header, results)
    (out / 'bench.md').write_text(table)
    (out / 'bench.json').write_text(json.dumps(
        {'header': header, 'results': results}, indent=1))
  print(table, end='')
  log(f'wrote {out / "bench.md"} and {out / "bench.json"}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
