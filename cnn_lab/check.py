"""Sanity checks on a finished (or crashed) run, from its files.

  python -m cnn_lab.check monotonic WORKDIR [--key probe/loss]
                                            [--tolerance 0.001]

`monotonic`: did the cost fall at every logged step? With dropout on, the
training loss is a different function at every step (a new mask each time),
so its curve cannot answer that; `probe/loss` is the same function
throughout: the loss on a fixed training batch with dropout switched off.
The check to run before trusting a dropout run: train first with dropout off
(`--config.model.dropout_rate=0`, keep probability 1), confirm here that the
cost falls monotonically, then switch dropout on.

A step counts as a rise when the value exceeds the previous one by more than
`tolerance` times the previous value (relative; default 0.001, i.e. 0.1%:
float32 round-off and the last digits of a converged run stay below it).

Exit status: 0 monotonic, 1 not (the rises are listed), 2 bad input.
"""

import math
import sys

from cnn_lab.errors import ArgumentParser
from cnn_lab.writers import read_metrics

DEFAULT_TOLERANCE = 1e-3


def find_rises(steps, values, tolerance: float = DEFAULT_TOLERANCE):
  """(step, previous value, value) for every logged step where `values`
  rose by more than `tolerance` x previous, or became non-finite."""
  rises = []
  for i in range(1, len(values)):
    prev, cur = values[i - 1], values[i]
    if not math.isfinite(cur) or cur > prev + tolerance * abs(prev):
      rises.append((steps[i], prev, cur))
  return rises


def check_monotonic(workdir, key: str = 'probe/loss',
                    tolerance: float = DEFAULT_TOLERANCE) -> int:
  try:
    lines = read_metrics(workdir)
  except UnicodeDecodeError as e:
    raise ValueError(f'{workdir}/metrics.jsonl is not text: {e}') from None
  pairs = []
  for line in lines:
    if not (isinstance(line, dict) and isinstance(line.get('step'), int)
            and key in line):
      continue  # Not a metrics line of this key.
    try:
      pairs.append((line['step'], float(line[key])))
    except (TypeError, ValueError):
      raise ValueError(f'{workdir}/metrics.jsonl: {key}={line[key]!r} at '
                       f'step {line["step"]} is not a number') from None
  if len(pairs) < 2:
    raise ValueError(f'{workdir} has {len(pairs)} logged value(s) of {key}; '
                     'the check needs at least 2 (log more often with '
                     '--config.log_every_steps)')
  steps, values = zip(*pairs)
  rises = find_rises(steps, values, tolerance)
  span = (f'{key} over {len(values)} logged steps ({steps[0]}..{steps[-1]}):'
          f' {values[0]:.4f} -> {values[-1]:.4f}')
  if not rises:
    print(f'monotonic: {span}, never rose by more than {tolerance:g} '
          'relative')
    return 0
  print(f'NOT monotonic: {span}; {len(rises)} rise(s) above {tolerance:g} '
        'relative:')
  for step, prev, cur in rises:
    print(f'  step {step}: {prev:.6f} -> {cur:.6f}')
  return 1


def main(argv=None) -> int:
  parser = ArgumentParser(
      prog='python -m cnn_lab.check', description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  mono = sub.add_parser('monotonic', help='did the probe loss fall at every '
                        'logged step?')
  mono.add_argument('workdir')
  mono.add_argument('--key', default='probe/loss',
                    help='metric to check (default probe/loss)')
  mono.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                    help='allowed rise, relative to the previous value '
                    f'(default {DEFAULT_TOLERANCE:g})')
  args = parser.parse_args(argv)
  if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
    print(f'error: --tolerance={args.tolerance} must be a number >= 0',
          file=sys.stderr)
    return 2
  try:
    return check_monotonic(args.workdir, args.key, args.tolerance)
  except (OSError, ValueError) as e:
    msg = (f'{args.workdir} is not a cnn_lab run: it has no metrics.jsonl'
           if isinstance(e, FileNotFoundError) else str(e))
    print(f'error: {msg}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
