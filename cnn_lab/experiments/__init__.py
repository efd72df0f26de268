r"""The experiments: cnn_lab's answers to the classic questions, each a folder
`experiments/NAME/` (its README, its sweep files, its figures) and a module
here that says how to run it and how to read its runs.

  python -m cnn_lab.experiments list
  python -m cnn_lab.experiments run NAME [--budget=cpu|full|tiny]
      [--workdir=runs/experiments/NAME] [--out=experiments/NAME]

An experiment is a few stages, each one sweep file (`experiments/NAME/*.py`,
an ordinary cnn_lab sweep: `launch.py --config=...` runs it alone) trained
under a budget: `full` is the sweep file as written (the paper-scale run,
for accelerators), `cpu` the command-line overrides that fit it into a few
minutes of a 2-core CPU, `tiny` a smoke test of every run in seconds (the
test suite runs it). Then the module's `analyse` reads the run folders
(files only, like the plots and the report) and writes the experiment's
tables and figures: `results.md` and `figures/*.png` in --out, and the
table into the README between its `<!-- results -->` markers.

The sweep files live in `experiments/`, which imports cnn_lab; this package
never imports them: it hands their paths to launch.py.
"""

import dataclasses
import importlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

from cnn_lab.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = ROOT / 'experiments'
BUDGETS = ('cpu', 'full', 'tiny')
# The order of the issue and of the top-level README.
NAMES = ('batch_norm', 'degradation', 'vanishing_gradients',
         'exploding_gradients', 'dropout_cost', 'one_by_one', 'bn_inference')
RESULTS_BEGIN = '<!-- results:begin -->'
RESULTS_END = '<!-- results:end -->'
TIMING = 'timing.json'  # In the workdir: the last run's date and seconds.

# Flags every tiny run shares: a handful of steps at a small batch, every
# step logged, a small evaluation, the tasks in this process, no per-run
# plots and no sweep report (the analysis still draws its figures).
TINY = ('--config.train.num_steps=3', '--config.train.batch_size=8',
        '--config.log_every_steps=1', '--config.eval_every_steps=0',
        '--config.eval_num_examples=16', '--config.eval_batch_size=16',
        '--config.probe_batch_size=8', '--config.checkpoint_every_steps=0',
        '--config.plots=False', '--executor=inprocess', '--nosweep_report')


@dataclasses.dataclass(frozen=True)
class Stage:
  """One sweep of an experiment: its file (relative to experiments/NAME/)
  and the launch.py flags of each budget but `full` (which has none)."""
  name: str
  sweep: str
  cpu: tuple[str, ...] = ()
  tiny: tuple[str, ...] = ()

  def flags(self, budget: str) -> tuple[str, ...]:
    if budget == 'full':
      return ()
    if budget == 'tiny':
      return TINY + self.tiny
    return self.cpu


def module(name: str):
  """The experiment's module (stages, analyse); ConfigError if unknown."""
  if name not in NAMES:
    raise ConfigError(f'{name!r} is not an experiment; the experiments are '
                      f'{", ".join(NAMES)}')
  return importlib.import_module(f'cnn_lab.experiments.{name}')


def machine() -> str:
  """A short description of this machine for the results' header."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return f'{len(os.sched_getaffinity(0))} CPU cores ({cpu})'


def run_stage(name: str, stage: Stage, folder: pathlib.Path, budget: str,
              python: str = sys.executable) -> int:
  """Trains one stage's sweep into `folder` with launch.py; returns its exit
  status (0 all finished, 1 some runs failed: diverging runs are part of
  some experiments). Raises ConfigError for any other status."""
  sweep = EXPERIMENTS_DIR / name / stage.sweep
  cmd = [python, str(ROOT / 'launch.py'), f'--config={sweep}',
         f'--workdir={folder}', *stage.flags(budget)]
  print(f'== {name}/{stage.name}: {" ".join(cmd[1:])}', flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ,
                                                PYTHONUNBUFFERED='1'))
  if proc.returncode not in (0, 1):
    raise ConfigError(f'{name}/{stage.name}: launch.py exited with status '
                      f'{proc.returncode} (its output is above)')
  return proc.returncode


def write_results(out: pathlib.Path, name: str, title: str, budget: str,
                  seconds: float, body: str,
                  date: str | None = None) -> pathlib.Path:
  """results.md in `out`, and the same text between the README's markers
  when `out` holds a README that has them. `seconds` and `date` are those
  of the run that trained (today's date if None)."""
  minutes, secs = divmod(int(seconds), 60)
  header = (f'Measured {date or time.strftime("%Y-%m-%d")} with `python -m '
            f'cnn_lab.experiments run {name}'
            + ('' if budget == 'cpu' else f' --budget={budget}') + f'` on '
            f'{machine()}: {minutes} min {secs:02d} s in all.')
  text = f'{header}\n\n{body.strip()}\n'
  (out / 'results.md').write_text(f'# {title}: results\n\n{text}')
  readme = out / 'README.md'
  if readme.is_file():
    old = readme.read_text()
    pattern = re.compile(re.escape(RESULTS_BEGIN) + '.*?'
                         + re.escape(RESULTS_END), re.S)
    if pattern.search(old):
      new = pattern.sub(lambda _: f'{RESULTS_BEGIN}\n{text}{RESULTS_END}',
                        old)
      readme.write_text(new)
  return out / 'results.md'


def run(name: str, budget: str = 'cpu', workdir=None, out=None,
        stages=None, train: bool = True) -> pathlib.Path:
  """Runs experiment `name` under `budget` and writes its results; returns
  the path of results.md. `stages` (names) limits the training to some
  stages, whose folders are then read with the others' existing ones;
  `train=False` only reads and analyses them."""
  exp = module(name)
  if budget not in BUDGETS:
    raise ConfigError(f'--budget={budget!r} is not allowed; choose one of '
                      f'{", ".join(BUDGETS)}')
  suffix = '' if budget == 'cpu' else f'-{budget}'
  workdir = pathlib.Path(workdir or ROOT / 'runs' / 'experiments'
                         / f'{name}{suffix}')
  out = pathlib.Path(out or (EXPERIMENTS_DIR / name if budget == 'cpu'
                             else workdir / 'results'))
  known = [s.name for s in exp.STAGES]
  for s in stages or ():
    if s not in known:
      raise ConfigError(f'{s!r} is not a stage of {name}; its stages are '
                        f'{", ".join(known)}')
  folders = {s.name: workdir / s.name for s in exp.STAGES}
  if not train:
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
      flag = '' if budget == 'cpu' else f' --budget={budget}'
      raise ConfigError(f'{missing[0]} does not exist: run the experiment '
                        'first (python -m cnn_lab.experiments run '
                        f'{name}{flag})')
  start = time.monotonic()
  for stage in exp.STAGES:
    if train and (not stages or stage.name in stages):
      run_stage(name, stage, folders[stage.name], budget)
  (out / 'figures').mkdir(parents=True, exist_ok=True)
  print(f'== {name}: analysing {workdir}', flush=True)
  body = exp.analyse(folders, out / 'figures', budget)
  # The header gives the time of the last `run` (training and analysis):
  # recorded in the workdir, so that `analyse` alone keeps it.
  timing = workdir / TIMING
  if train:
    workdir.mkdir(parents=True, exist_ok=True)
    timing.write_text(json.dumps({
        'date': time.strftime('%Y-%m-%d'),
        'seconds': round(time.monotonic() - start, 1)}) + '\n')
  try:
    measured = json.loads(timing.read_text())
    seconds, date = float(measured['seconds']), str(measured['date'])
  except (OSError, ValueError, KeyError, TypeError):
    seconds, date = time.monotonic() - start, None
  path = write_results(out, name, exp.TITLE, budget, seconds, body, date)
  print(f'== {name}: done in {time.monotonic() - start:.0f} s; results in '
        f'{path}, figures in {out / "figures"}', flush=True)
  return path
