r"""python -m cnn_lab.experiments list | run NAME [--budget=cpu|full|tiny]
[--workdir=DIR] [--out=DIR] [--stage=STAGE ...] | analyse NAME ...

`run` trains the experiment's sweeps under the budget, then writes its
tables and figures (cnn_lab/experiments/__init__.py); `analyse` only
re-reads the run folders of an earlier `run` and writes them again.
Exit status 0 done, 2 bad input (one line on stderr).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from cnn_lab import experiments  # noqa: E402
from cnn_lab.errors import ArgumentParser, ConfigError  # noqa: E402


def main(argv=None) -> int:
  parser = ArgumentParser(prog='python -m cnn_lab.experiments',
                          description=__doc__.split('\n\n')[1])
  sub = parser.add_subparsers(dest='command', required=True)
  sub.add_parser('list', help='the experiments and their questions')
  for command in ('run', 'analyse'):
    p = sub.add_parser(command, help='train and analyse one experiment'
                       if command == 'run' else 'analyse its runs again')
    p.add_argument('name', help=', '.join(experiments.NAMES))
    p.add_argument('--budget', default='cpu', help='cpu (minutes on a '
                   '2-core CPU, the default), full (the paper-scale sweep, '
                   'for accelerators) or tiny (a smoke test)')
    p.add_argument('--workdir', help='folder of its sweeps (default '
                   'runs/experiments/NAME[-BUDGET])')
    p.add_argument('--out', help='folder of results.md and figures/ '
                   '(default experiments/NAME for the cpu budget, else '
                   'WORKDIR/results)')
    if command == 'run':
      p.add_argument('--stage', action='append', default=[],
                     help='train only this stage (repeatable); the others '
                     'are read as they are')
  args = parser.parse_args(argv)
  try:
    if args.command == 'list':
      for name in experiments.NAMES:
        exp = experiments.module(name)
        print(f'{name:20s} {exp.TITLE}: {exp.QUESTION}')
      return 0
    experiments.run(args.name, args.budget, args.workdir, args.out,
                    stages=getattr(args, 'stage', None),
                    train=args.command == 'run')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
