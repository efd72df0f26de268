r"""A finished run's checkpoint under two batch-norm inference modes.

  python -m cnn_lab.evaluate WORKDIR [--modes moving,batch]
      [--batch_sizes 500,50,8,1] [--num_examples N] [--out FILE.json]

For the question of Ioffe & Szegedy, "Batch Normalization" (ICML 2015),
Sec. 3.1: at inference, normalise by the moving averages gathered in
training, or by the statistics of the test batch itself?

  moving  the usual evaluation (`train=False`): the moving averages, the
          same function whatever the batch size; it repeats the run's own
          evaluation at its eval batch size
  batch   training-mode batch norm on each test batch's own mean and
          variance, with dropout off and the moving averages left as the
          checkpoint holds them (`steps.train_mode_logits`)

In batch mode the answer for an image depends on the other images of its
batch, so the batch size is the experiment's variable. At batch size 1 each
image is normalised over its own spatial positions only, and a layer whose
map is 1x1 (a dense layer, or a convolution after global pooling) sees a
variance of zero: its output collapses to its bias, the same for every
image. Batch mode takes whole batches only (the padding of a last partial
batch would enter the statistics), so it evaluates floor(N / batch size) x
batch size of the N examples; moving mode evaluates all N.

The run is rebuilt from WORKDIR/config.json through `train.build_run` and
its latest complete checkpoint restored; everything runs on one device.
One line per (mode, batch size) is printed and the results are written to
WORKDIR/inference.json (or --out): {"step": <the checkpoint's step>,
"results": [{mode, batch_size, examples, loss, accuracy}, ...]}. Exit
status 2 with one line on stderr for bad input: a folder that is not a run,
no checkpoint, a bad batch size or an unknown mode.
"""

import dataclasses
import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from cnn_lab import checkpoints as checkpoints_lib  # noqa: E402
from cnn_lab import data as data_lib  # noqa: E402
from cnn_lab import steps as steps_lib  # noqa: E402
from cnn_lab import train, writers  # noqa: E402
from cnn_lab.errors import ArgumentParser, ConfigError  # noqa: E402

MODES = ('moving', 'batch')
DEFAULT_BATCH_SIZES = (500, 50, 8, 1)
PROGRESS_EVERY_S = 5.0  # A progress line at least this often.


def _print(line: str) -> None:
  print(line, flush=True)


def batch_mode_eval_step(state: steps_lib.TrainState, batch) -> dict:
  """`steps.eval_step` with batch norm on the batch's own statistics."""
  return steps_lib.eval_sums(
      steps_lib.train_mode_logits(state, batch['image']), batch)


STEPS = {'moving': steps_lib.eval_step, 'batch': batch_mode_eval_step}


@dataclasses.dataclass(frozen=True)
class Result:
  mode: str
  batch_size: int
  examples: int  # Evaluated: in batch mode, whole batches only.
  loss: float
  accuracy: float


# --- the command line's values ---


def parse_modes(text: str) -> tuple[str, ...]:
  """'moving,batch' -> ('moving', 'batch'), repeats dropped (`evaluate_run`
  checks the names)."""
  return tuple(dict.fromkeys(m.strip() for m in text.split(',')))


def parse_batch_sizes(text: str) -> tuple[int, ...]:
  """'500,50,8,1' -> (500, 50, 8, 1), repeats dropped; ConfigError for
  anything but positive integers."""
  sizes = []
  for part in text.split(','):
    try:
      size = int(part.strip())
    except ValueError:
      size = 0
    if size <= 0:
      raise ConfigError(f'--batch_sizes: {part.strip()!r} is not a positive '
                        'integer')
    sizes.append(size)
  return tuple(dict.fromkeys(sizes))


def check_whole_batches(batch_sizes: Sequence[int], modes: Sequence[str],
                        num_examples: int) -> None:
  """Batch mode needs at least one whole batch of the examples."""
  too_large = [b for b in batch_sizes if b > num_examples]
  if 'batch' in modes and too_large:
    raise ConfigError(
        f'batch size {too_large[0]} is larger than the {num_examples} '
        'examples evaluated: batch mode takes whole batches only (lower it '
        'or raise --num_examples)')


# --- the run ---


def load_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The run's config.json as the ConfigDict `train` builds from."""
  path = workdir / 'config.json'
  if not path.is_file():
    raise ConfigError(f'{workdir} is not a cnn_lab run: it has no '
                      'config.json')
  try:
    resolved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'cannot read {path}: {e}') from None
  if not isinstance(resolved, dict):
    raise ConfigError(f'{path} does not hold a JSON object')
  return ml_collections.ConfigDict(resolved)


def restore_run(workdir: pathlib.Path):
  """(run, state, step): the run of WORKDIR/config.json (`train.build_run`)
  with its latest complete checkpoint, on one device."""
  config = load_config(workdir)
  directory = workdir / 'checkpoints'
  # Before orbax, which would create the folder.
  if not directory.is_dir() or not any(
      p.name.isdigit() for p in directory.iterdir()):
    raise ConfigError(f'{workdir} has no checkpoint (nothing in '
                      f'{directory})')
  options = train.validate_config(config, workdir)
  run, template = train.build_run(config, options)
  checkpoints = checkpoints_lib.Checkpoints(
      workdir, keep=options.checkpoint_keep)
  try:
    state, step = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  if not step:
    raise ConfigError(f'{workdir} has no checkpoint that restores')
  # One device, whatever the machine has: batch sizes down to 1 cannot be
  # split among several.
  return run, jax.device_put(state, jax.devices()[0]), step


def logged_evaluation(workdir: pathlib.Path, step: int) -> dict:
  """The eval/* values the run logged at `step` ({} when none)."""
  if not (workdir / 'metrics.jsonl').is_file():
    return {}
  for line in reversed(writers.read_metrics(workdir)):
    if (isinstance(line, dict) and line.get('step') == step
        and 'eval/accuracy' in line):
      return {k: float(v) for k, v in line.items() if k.startswith('eval/')}
  return {}


# --- evaluation ---


def evaluate_mode(state, pipeline, mode: str, batch_size: int,
                  num_examples: int, report: Callable = _print) -> Result:
  """`mode` at `batch_size` over the first `num_examples` test examples;
  in batch mode whole batches only. The step compiles once; a progress
  line comes at least every PROGRESS_EVERY_S."""
  if mode == 'batch':
    num_examples -= num_examples % batch_size
  label = f'{mode} batch {batch_size}'
  device = jax.devices()[0]
  batches = data_lib.prefetch(pipeline.eval_batches(batch_size, num_examples),
                              3, lambda b: jax.device_put(b, device))
  first = next(batches)
  t_begin = time.perf_counter()
  step_fn = jax.jit(STEPS[mode]).lower(state, first).compile()
  t_start = t_last = time.perf_counter()
  if t_start - t_begin >= 1:
    report(f'  {label}: compiled in {t_start - t_begin:.1f}s')
  totals, done = None, 0
  for batch in itertools.chain([first], batches):
    out = step_fn(state, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    done = min(done + batch_size, num_examples)
    if (time.perf_counter() - t_last >= PROGRESS_EVERY_S
        and done < num_examples):
      jax.block_until_ready(totals)  # The count is of finished batches.
      t_last = time.perf_counter()
      rate = done / (t_last - t_start)
      report(f'  {label}: {done}/{num_examples} examples, {rate:.0f} img/s, '
             f'eta {(num_examples - done) / rate:.0f}s')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return Result(mode=mode, batch_size=batch_size, examples=int(count),
                loss=float(totals['loss_sum']) / count,
                accuracy=float(totals['correct_sum']) / count)


def evaluate_modes(state, pipeline, modes: Sequence[str],
                   batch_sizes: Sequence[int], num_examples: int,
                   report: Callable = _print) -> list[Result]:
  """Every mode at every batch size, in the order given (batch sizes
  outer), each result reported in one line as it comes."""
  results = []
  for batch_size in batch_sizes:
    for mode in modes:
      result = evaluate_mode(state, pipeline, mode, batch_size, num_examples,
                             report)
      left_out = num_examples - result.examples
      note = (f'  ({left_out} examples left out: whole batches only)'
              if left_out else '')
      report(f'{mode:<6}  batch {batch_size:>5}  {result.examples:>6} '
             f'examples  loss {result.loss:.4f}  accuracy '
             f'{result.accuracy:.4f}{note}')
      results.append(result)
  return results


def evaluate_run(workdir, modes: Sequence[str] = MODES,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 num_examples: int | None = None, out=None,
                 report: Callable = _print) -> dict:
  """Evaluates the run in `workdir` (module docstring) and writes the
  results to `out` (default WORKDIR/inference.json); returns what it
  wrote. Raises ConfigError for bad input, before evaluating anything."""
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out else workdir / 'inference.json'
  for mode in modes:
    if mode not in MODES:
      raise ConfigError(f'mode {mode!r} is unknown; choose from '
                        f'{", ".join(MODES)}')
  for size in batch_sizes:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
      raise ConfigError(f'batch size {size!r} is not a positive integer')
  if num_examples is not None and (
      not isinstance(num_examples, int) or num_examples <= 0):
    raise ConfigError(f'--num_examples={num_examples!r} is not a positive '
                      'integer')
  if out.is_dir():
    raise ConfigError(f'--out {out} is a folder; give a file name')
  run, state, step = restore_run(workdir)
  test = run.datasets.test
  num_examples = min(num_examples or run.eval_num_examples or len(test),
                     len(test))
  check_whole_batches(batch_sizes, modes, num_examples)
  report(f'{workdir}: {run.resolved["model"]["name"]}, checkpoint of step '
         f'{step}, {num_examples} test examples of {run.datasets.name}')
  logged = logged_evaluation(workdir, step)
  if logged:
    report(f'  the run logged at step {step} (moving, batch '
           f'{run.eval_batch_size}): loss {logged["eval/loss"]:.4f}  '
           f'accuracy {logged["eval/accuracy"]:.4f}')
  if 'batch' in modes and not state.batch_stats:
    report("  the model has no batch norm: mode 'batch' is the same as "
           "'moving' (computed all the same)")
  results = evaluate_modes(state, test, modes, batch_sizes, num_examples,
                           report)
  # JSON has no NaN: a diverged run's loss is written as the string 'nan'.
  written = {'step': step, 'results': [
      {k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
       for k, v in dataclasses.asdict(r).items()} for r in results]}
  writers.write_json_atomic(out, written)
  report(f'wrote {out}')
  return written


def main(argv=None) -> int:
  parser = ArgumentParser(prog='python -m cnn_lab.evaluate',
                          description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir', help='the run folder')
  parser.add_argument('--modes', default=','.join(MODES),
                      help='comma-separated, from: moving (the moving '
                      'averages), batch (each batch\'s own statistics); '
                      'default %(default)s')
  parser.add_argument('--batch_sizes',
                      default=','.join(map(str, DEFAULT_BATCH_SIZES)),
                      help='comma-separated; default %(default)s')
  parser.add_argument('--num_examples', type=int, default=None,
                      help='the first N test examples (default: the run\'s '
                      'eval_num_examples, or the whole test split)')
  parser.add_argument('--out', default=None,
                      help='the JSON file to write (default '
                      'WORKDIR/inference.json)')
  args = parser.parse_args(argv)
  try:
    evaluate_run(args.workdir, parse_modes(args.modes),
                 parse_batch_sizes(args.batch_sizes), args.num_examples,
                 args.out)
  except (ConfigError, OSError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
