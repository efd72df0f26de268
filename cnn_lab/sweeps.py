r"""Sweeps: one config file, many runs.

A config file that defines `get_sweep()` besides `get_config()` is a sweep:
`get_sweep()` returns a list of overrides, one dict of dotted config fields
per run, built with the helpers below:

  def get_sweep():
    return sweeps.product(sweeps.sweep('model.norm', ['batch', 'none']),
                          sweeps.sweep('model.dropout_rate', [0.0, 0.3]),
                          sweeps.sweep('seed', range(3)))

  python launch.py --config=configs/sweeps/NAME.py --workdir=runs/NAME \
      [--parallel=2] [--config.train.num_steps=100 ...]

Every run is named after its overrides (`norm=none,dropout_rate=0.3,seed=1`)
and trains into its own sub-folder `runs/NAME/<run name>/`, an ordinary run
folder; `runs/NAME/sweep.json` lists the runs, and `python -m cnn_lab.report
runs/NAME` tables and plots them (the sweep runs it at the end). The
`--config.*` flags of the command line apply to every run.

Runs are carried out in tasks: a task is one run, or, when the sweep varies
`seed`, the runs that differ only in their seed, trained together in one
program (`cnn_lab.seed_group`; `--vmap_seeds=false` runs them one by one).
Each task is one `launch.py --sweep_run=NAME ...` process: `--parallel=N`
of them at a time on this machine (the default), one SLURM job each with
`--executor=slurm` (submitit), or their commands printed with
`--emit_commands`; `--executor=inprocess` trains the tasks one after the
other in the launching process itself (no start-up per task: for many
tiny runs, as in the experiments' smoke tests). A finished run
(`done.json` in its folder, written with the same config) is skipped when
the sweep is launched again; an interrupted one resumes from its
checkpoints; a failing one does not stop the others, and the sweep ends
with a list of what failed and why.

The helpers and the expansion import no JAX (a config file imports this
module); the process pool and submitit are only imported to run a sweep.
"""

import builtins
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

from cnn_lab.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Written into a run's folder when the sweep saw it finish (the sweep skips
# it when launched again, if its config.json still matches).
DONE_FILE = 'done.json'
SWEEP_FILE = 'sweep.json'
EXECUTORS = ('local', 'slurm', 'submitit_local', 'inprocess')


# --- building sweeps: the helpers config files call ---


def sweep(field: str, values: Iterable) -> list[dict]:
  """One field over `values`: [{field: v} for v in values]."""
  if not isinstance(field, str) or not field:
    raise ConfigError(f'sweep(): the field must be a dotted config field '
                      f'name such as "model.norm", not {field!r}')
  if isinstance(values, (str, bytes)):
    raise ConfigError(f'sweep({field!r}, {values!r}): the values must be a '
                      'list, not a string')
  return [{field: v} for v in values]


def product(*sweeps: Sequence[dict]) -> list[dict]:
  """Every combination, the first sweep varying slowest."""
  out = []
  for parts in itertools.product(*sweeps):
    out.append(_merge(parts))
  return out


def zip(*sweeps: Sequence[dict]) -> list[dict]:  # noqa: A001 (the name users expect)
  """The i-th overrides of every sweep together; all must be as long."""
  lengths = sorted({len(s) for s in sweeps})
  if len(lengths) > 1:
    raise ConfigError('sweeps.zip(): the sweeps have different lengths '
                      f'({", ".join(str(len(s)) for s in sweeps)})')
  return [_merge(parts) for parts in builtins.zip(*sweeps)]


def chain(*sweeps: Sequence[dict]) -> list[dict]:
  """The runs of one sweep after the other's."""
  return [dict(o) for s in sweeps for o in s]


def _merge(parts) -> dict:
  out = {}
  for part in parts:
    for field, value in part.items():
      if field in out:
        raise ConfigError(f'sweeps: the field {field!r} is set twice in one '
                          'run (by two of the combined sweeps)')
      out[field] = value
  return out


# --- expansion: config file -> runs ---


@dataclasses.dataclass(frozen=True)
class SweepRun:
  name: str
  overrides: dict  # Dotted field -> value.
  config: Any  # ml_collections.ConfigDict, the overrides applied.


@dataclasses.dataclass(frozen=True)
class Task:
  """What one process trains: one run, or runs that differ only in seed."""
  name: str
  runs: tuple[SweepRun, ...]


def load_sweep(path: str) -> list[dict] | None:
  """The overrides `get_sweep()` of the config file returns; None when the
  file defines no get_sweep (an ordinary config)."""
  spec = importlib.util.spec_from_file_location('_cnn_lab_sweep', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # launch.py has loaded it once already.
    raise ConfigError(f'cannot load {path}: {type(e).__name__}: {e}') from None
  if not hasattr(module, 'get_sweep'):
    return None
  try:
    overrides = module.get_sweep()
  except ConfigError as e:
    raise ConfigError(f'get_sweep() of {path}: {e}') from None
  except Exception as e:
    raise ConfigError(f'get_sweep() of {path} failed: {type(e).__name__}: '
                      f'{e}') from None
  if (not isinstance(overrides, (list, tuple))
      or not all(isinstance(o, dict) for o in overrides)):
    raise ConfigError(f'get_sweep() of {path} must return a list of dicts '
                      '(dotted field -> value), e.g. from sweeps.product()')
  return [dict(o) for o in overrides]


def swept_fields(overrides: list[dict]) -> list[str]:
  """The fields any run overrides, in the order they first appear."""
  return list(dict.fromkeys(f for o in overrides for f in o))


def expand(base_config, overrides: list[dict], path: str = 'the sweep',
           fixed: Iterable[str] = ()) -> list[SweepRun]:
  """One SweepRun per override dict, named after it, `base_config` (left
  unchanged) with the overrides applied. `fixed` are the fields the command
  line set (--config.X=...), which a sweep may not vary as well. Raises
  ConfigError for no runs, an unknown field, a value of the wrong type, a
  field also set on the command line, and two runs of the same name."""
  if not overrides:
    raise ConfigError(f'{path} expands to no runs: get_sweep() returned an '
                      'empty list')
  fields = swept_fields(overrides)
  for field in fields:
    if field in set(fixed):
      raise ConfigError(f'--config.{field} is set on the command line and '
                        f'swept by {path}; drop one of them')
  labels = _short_labels(fields)
  runs, seen = [], {}
  for o in overrides:
    config = base_config.copy_and_resolve_references()
    for field, value in o.items():
      _set_field(config, field, value, path)
    # As the config holds them (an int given for a float field is a float).
    o = {field: _get_field(config, field) for field in o}
    name = run_name(o, labels)
    if name in seen:
      raise ConfigError(f'{path} has two runs named {name!r} (overrides '
                        f'{seen[name]} and {o}); every run needs its own '
                        'values')
    seen[name] = o
    runs.append(SweepRun(name=name, overrides=o, config=config))
  return runs


def _set_field(config, field: str, value, path: str) -> None:
  node, parts = config, field.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      where = '.'.join(parts[:i]) or 'the config'
      known = ', '.join(node.keys()) if hasattr(node, 'keys') else ''
      raise ConfigError(f'{path} overrides the unknown config field '
                        f'{field!r}: {where} has the fields {known}')
    if i < len(parts) - 1:
      node = node[part]
  try:
    setattr(node, parts[-1], value)
  except (TypeError, ValueError, AttributeError) as e:
    raise ConfigError(f'{path} sets {field}={value!r}: '
                      f'{" ".join(str(e).split())}') from None


def _get_field(config, field: str):
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def _short_labels(fields: list[str]) -> dict[str, str]:
  """Each field's label in run names: its last part, unless two fields
  share it, then the whole dotted name."""
  last = [f.rsplit('.', 1)[-1] for f in fields]
  return {f: (l if last.count(l) == 1 else f) for f, l in
          builtins.zip(fields, last)}


def format_value(value) -> str:
  """A value as it reads in a run name."""
  if isinstance(value, bool) or value is None:
    return str(value).lower()
  if isinstance(value, float):
    return repr(value) if math.isfinite(value) else str(value)
  if isinstance(value, (list, tuple)):
    return 'x'.join(format_value(v) for v in value)
  return str(value)


def run_name(overrides: dict, labels: dict[str, str] | None = None) -> str:
  labels = labels or _short_labels(list(overrides))
  name = ','.join(f'{labels[f]}={format_value(v)}'
                  for f, v in overrides.items())
  if not name or '/' in name or name in ('.', '..') or len(
      name.encode()) > 200 or any(c in name for c in '\0\n'):
    raise ConfigError(f'the run name {name!r} cannot be a folder name (from '
                      f'the overrides {overrides}); use simpler values')
  return name


def group_tasks(runs: list[SweepRun], vmap_seeds: bool = True) -> list[Task]:
  """The runs in tasks, in sweep order: with `vmap_seeds`, the runs whose
  overrides differ only in `seed` form one task."""
  if not vmap_seeds or not any('seed' in r.overrides for r in runs):
    return [Task(r.name, (r,)) for r in runs]
  groups: dict[tuple, list[SweepRun]] = {}
  for r in runs:
    key = tuple((f, json.dumps(v, default=str))
                for f, v in r.overrides.items() if f != 'seed')
    groups.setdefault(key, []).append(r)
  tasks = []
  for members in groups.values():
    if len(members) == 1:
      tasks.append(Task(members[0].name, tuple(members)))
      continue
    rest = {f: v for f, v in members[0].overrides.items() if f != 'seed'}
    labels = _short_labels(list(members[0].overrides))
    seeds = ','.join(format_value(m.overrides['seed']) for m in members)
    parts = [f'{labels[f]}={format_value(v)}' for f, v in rest.items()]
    tasks.append(Task(','.join(parts + [f'seed={{{seeds}}}']),
                      tuple(members)))
  return tasks


# --- the sweep folder ---


def write_sweep_file(folder: pathlib.Path, config_path: str,
                     runs: list[SweepRun], command_overrides: list[str]
                     ) -> None:
  """`sweep.json`: the config file, the swept fields, the command line's
  overrides and every run's name and overrides (what the report reads)."""
  from cnn_lab import writers
  folder.mkdir(parents=True, exist_ok=True)
  writers.write_json_atomic(folder / SWEEP_FILE, {
      'config': config_path,
      'fields': swept_fields([r.overrides for r in runs]),
      'command_overrides': command_overrides,
      'runs': [{'name': r.name, 'overrides': r.overrides} for r in runs]})


def is_finished(run: SweepRun, folder: pathlib.Path) -> bool:
  """Whether the run's folder holds it finished: done.json, and a
  config.json that agrees with the run's config in every field it sets
  (fields resolved at run time, such as num_classes, are left out)."""
  workdir = folder / run.name
  try:
    json.loads((workdir / DONE_FILE).read_text())
    written = json.loads((workdir / 'config.json').read_text())
  except (OSError, ValueError):
    return False
  wanted = json.loads(json.dumps(run.config.to_dict(), default=str))
  return _agrees(wanted, written)


def _agrees(wanted, written) -> bool:
  return not _disagreements(wanted, written)


def _disagreements(wanted, written, prefix='') -> list[tuple[str, Any, Any]]:
  """(field, value there, value here) where a written config.json differs
  from the config a run would write (None here: resolved at run time)."""
  if isinstance(wanted, dict):
    if not isinstance(written, dict):
      return [(prefix.rstrip('.'), written, wanted)]
    return [d for k, v in wanted.items()
            for d in _disagreements(v, written.get(k, '<absent>'),
                                    f'{prefix}{k}.')]
  return [] if wanted is None or wanted == written else [
      (prefix.rstrip('.'), written, wanted)]


def other_config(run: SweepRun, folder: pathlib.Path
                 ) -> list[tuple[str, Any, Any]]:
  """How the config.json in the run's folder differs from the run's config
  (empty when there is none, or it is this run's)."""
  try:
    written = json.loads((folder / run.name / 'config.json').read_text())
  except (OSError, ValueError):
    return []
  return _disagreements(
      json.loads(json.dumps(run.config.to_dict(), default=str)), written)


def mark_finished(workdir: pathlib.Path, result: dict) -> None:
  from cnn_lab import writers
  writers.write_json_atomic(workdir / DONE_FILE, {
      'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
      **{k: float(v) for k, v in result.items()}})


# --- one task, in its own process ---


def train_task(runs: list[SweepRun], folder: pathlib.Path,
               overwrite: bool = False) -> int:
  """Trains the runs of one task (`launch.py --sweep_run=...`): one run
  with train_and_evaluate, several seeds together with seed_group; marks
  each finished run. Raises ConfigError / Diverged like a single run."""
  workdirs = [folder / r.name for r in runs]
  if len(runs) == 1:
    from cnn_lab.train import train_and_evaluate
    results = [train_and_evaluate(runs[0].config, workdirs[0], overwrite)]
  else:
    from cnn_lab import seed_group
    try:
      results = seed_group.train_seed_group(
          [r.config for r in runs], workdirs, overwrite=overwrite)
    except seed_group.Diverged as e:  # Some seeds halted, the others ended.
      _mark_all(workdirs, e.results)
      raise
  _mark_all(workdirs, results)
  return 0


def _mark_all(workdirs, results) -> None:
  for workdir, result in builtins.zip(workdirs, results):
    if result is not None:
      mark_finished(workdir, result)


# --- the commands of a sweep ---


def task_command(task: Task, config_path: str, folder: pathlib.Path,
                 command_overrides: list[str], *, overwrite: bool = False,
                 vmap_seeds: bool = True, python: str | None = None
                 ) -> list[str]:
  """The launch.py command line that trains `task`."""
  cmd = [python or sys.executable, str(ROOT / 'launch.py'),
         f'--config={config_path}', f'--workdir={folder}']
  cmd += [f'--sweep_run={r.name}' for r in task.runs]
  cmd += list(command_overrides)
  if overwrite:
    cmd.append('--overwrite')
  if not vmap_seeds:
    cmd.append('--novmap_seeds')
  return cmd


def failure_reason(log_text: str, returncode: int | None) -> str:
  """Why a task failed, from its output: its `error:` line, else the last
  line (a traceback's exception), else the exit status."""
  lines = [l.strip() for l in log_text.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  if errors:
    return errors[-1][len('error:'):].strip()
  if lines:
    return f'exit status {returncode}: {lines[-1]}'
  return f'exit status {returncode}, no output'


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Tally:
  """The running count of a sweep's tasks and the time left."""

  def __init__(self, total: int, parallel: int, clock=time.monotonic):
    self.total, self.parallel, self.clock = total, max(parallel, 1), clock
    self.t0 = clock()
    self.done = self.failed = 0
    self.durations: list[float] = []
    self.started: dict[str, float] = {}

  def start(self, name: str) -> None:
    self.started[name] = self.clock()

  def end(self, name: str, ok: bool) -> float:
    seconds = self.clock() - self.started.pop(name)
    self.durations.append(seconds)
    if ok:
      self.done += 1
    else:
      self.failed += 1
    return seconds

  @property
  def left(self) -> int:
    return self.total - self.done - self.failed - len(self.started)

  def eta(self) -> float | None:
    """Seconds left: the mean task time for each task not started, the
    rest of it for each running one, spread over the parallel slots."""
    if not self.durations:
      return None
    mean = sum(self.durations) / len(self.durations)
    now = self.clock()
    work = mean * self.left + sum(max(mean - (now - t), 0.0)
                                  for t in self.started.values())
    return work / min(self.parallel, max(self.left + len(self.started), 1))

  def line(self) -> str:
    eta = self.eta()
    return (f'[{self.done} done, {len(self.started)} running, '
            f'{self.failed} failed, {self.left} left | '
            f'{format_duration(self.clock() - self.t0)} so far, ' +
            (f'~{format_duration(eta)} to go]' if eta is not None
             else 'time to go unknown]'))


def _slot_env(slot: int, parallel: int, gpus_per_run: int) -> tuple[dict,
                                                                    set]:
  """Environment and CPU set of the process in `slot`: the machine's CPUs
  split between the slots, and `gpus_per_run` GPUs of its own."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  cpus = sorted(os.sched_getaffinity(0))
  share = len(cpus) // parallel
  mine = set(cpus[slot * share:(slot + 1) * share]) if share else set(cpus)
  env.setdefault('OMP_NUM_THREADS', str(max(len(mine), 1)))
  if gpus_per_run:
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    ids = (visible.split(',') if visible
           else [str(i) for i in range(parallel * gpus_per_run)])
    env['CUDA_VISIBLE_DEVICES'] = ','.join(
        ids[slot * gpus_per_run:(slot + 1) * gpus_per_run])
  return env, mine


def run_pool(tasks: list[Task], commands: dict[str, list[str]],
             folder: pathlib.Path, parallel: int, gpus_per_run: int = 0,
             poll_seconds: float = 0.2, out=None) -> dict[str, str]:
  """Runs the tasks' commands, `parallel` at a time, each in its own
  process with its output in `<folder>/logs/<task>.log`; prints a line per
  start, end and failure. Returns {task name: why it failed}."""
  out = out or sys.stdout
  logs = folder / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  tally = Tally(len(tasks), parallel)
  pending = list(tasks)
  running: dict[int, tuple[Task, subprocess.Popen, Any]] = {}
  failures: dict[str, str] = {}

  def say(text):
    print(f'{tally.line()} {text}', file=out, flush=True)

  def on_term(signum, frame):  # kill, a batch system's stop: as Ctrl-C.
    raise KeyboardInterrupt
  import signal
  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    while pending or running:
      for slot in range(parallel):
        if slot in running or not pending:
          continue
        task = pending.pop(0)
        env, cpus = _slot_env(slot, parallel, gpus_per_run)
        log = open(logs / f'{task.name}.log', 'w')
        # Pinned by taskset, not by a preexec_fn: that would fork this
        # process, which has JAX's threads running (it checked the configs).
        pin = (['taskset', '-c', ','.join(map(str, sorted(cpus)))]
               if parallel > 1 and shutil.which('taskset') else [])
        proc = subprocess.Popen(
            pin + commands[task.name], stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=os.getcwd(), start_new_session=True)
        running[slot] = (task, proc, log)
        tally.start(task.name)
        say(f'started {task.name}')
      time.sleep(poll_seconds)
      for slot, (task, proc, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[slot]
        ok = proc.returncode == 0
        seconds = tally.end(task.name, ok)
        text = (logs / f'{task.name}.log').read_text(errors='replace')
        if ok:
          say(f'finished {task.name} in {format_duration(seconds)}')
        else:
          failures[task.name] = failure_reason(text, proc.returncode)
          say(f'FAILED {task.name} after {format_duration(seconds)}: '
              f'{failures[task.name]}')
  except KeyboardInterrupt:
    for task, proc, log in running.values():
      _stop(proc)
      log.close()
      failures[task.name] = 'interrupted'
    print(f'interrupted: {len(running)} task(s) stopped; launch the same '
          'command again to resume them', file=out, flush=True)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  return failures


def run_in_process(tasks: list[Task], folder: pathlib.Path,
                   overwrite: bool = False, out=None) -> dict[str, str]:
  """Trains the tasks one after the other in this process (their output
  on this one's); a failing task (bad input, divergence, an exception) is
  recorded and the next one starts. Returns {task name: why it failed}."""
  out = out or sys.stdout
  tally = Tally(len(tasks), 1)
  failures = {}
  for task in tasks:
    tally.start(task.name)
    print(f'start {task.name} {tally.line()}', file=out, flush=True)
    try:
      train_task(list(task.runs), folder, overwrite)
      ok = True
    except KeyboardInterrupt:
      raise
    except Exception as e:  # noqa: BLE001 (one failure must not stop all)
      failures[task.name] = f'{type(e).__name__}: {e}'.splitlines()[0]
      ok = False
    seconds = tally.end(task.name, ok)
    what = 'done' if ok else f'FAILED ({failures[task.name]})'
    print(f'{what}: {task.name} in {format_duration(seconds)} '
          f'{tally.line()}', file=out, flush=True)
  return failures


def _stop(proc: subprocess.Popen) -> None:
  import signal
  try:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
  except (ProcessLookupError, subprocess.TimeoutExpired):
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def submit(tasks: list[Task], commands: dict[str, list[str]],
           folder: pathlib.Path, cluster: str, *, partition: str | None,
           gpus_per_run: int, time_limit_min: int, parallel: int,
           wait: bool, out=None) -> dict[str, str] | None:
  """Submits every task through submitit as one job array on `cluster`
  ('slurm', or 'local': submitit's local executor, real processes and
  job folders under `<folder>/submitit/`). With `wait`, waits for the jobs
  and returns {task name: why it failed}; otherwise prints the job ids and
  returns None."""
  out = out or sys.stdout
  import submitit
  executor = submitit.AutoExecutor(folder=folder / 'submitit',
                                   cluster=cluster)
  params = dict(timeout_min=time_limit_min, name=folder.name,
                tasks_per_node=1)
  if gpus_per_run:
    params['gpus_per_node'] = gpus_per_run
  if cluster == 'slurm':
    params['slurm_array_parallelism'] = parallel
    if partition:
      params['slurm_partition'] = partition
  executor.update_parameters(**params)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  functions = [submitit.helpers.CommandFunction(
      commands[t.name], cwd=os.getcwd(), env=env, verbose=False)
      for t in tasks]
  try:
    jobs = executor.submit_array(functions)
  except Exception as e:  # e.g. no sbatch on this machine.
    raise ConfigError(f'submitit could not submit the sweep to {cluster}: '
                      f'{" ".join(str(e).split())[:300]}') from None
  for task, job in builtins.zip(tasks, jobs):
    print(f'submitted {task.name}: job {job.job_id}', file=out, flush=True)
  if not wait:
    print(f'{len(jobs)} jobs submitted; their folders are in '
          f'{folder / "submitit"}. When they are done: python -m '
          f'cnn_lab.report {folder}', file=out, flush=True)
    return None
  tally = Tally(len(tasks), parallel)
  for task in tasks:
    tally.start(task.name)
  failures = {}
  for task, job in builtins.zip(tasks, jobs):
    try:
      job.result()
      tally.end(task.name, True)
      print(f'{tally.line()} finished {task.name} (job {job.job_id})',
            file=out, flush=True)
    except Exception as e:
      tally.end(task.name, False)
      text = '\n'.join(filter(None, [job.stdout() or '', job.stderr() or '',
                                     str(e)]))
      failures[task.name] = failure_reason(text, None)
      print(f'{tally.line()} FAILED {task.name} (job {job.job_id}): '
            f'{failures[task.name]}', file=out, flush=True)
  return failures


# --- launch.py's entry ---


def command_overrides(argv: list[str]) -> list[str]:
  """The --config.X=V flags of a command line, as given."""
  return [a for a in argv if a.startswith('--config.')]


def _overridden_fields(overrides: list[str]) -> list[str]:
  return [a[len('--config.'):].split('=', 1)[0] for a in overrides]


def run_sweep(config, config_path: str, overrides: list[dict],
              folder: pathlib.Path | None, argv: list[str], *,
              parallel: int = 1, executor: str = 'local',
              emit_commands: bool = False, sweep_runs: Sequence[str] = (),
              vmap_seeds: bool = True, overwrite: bool = False,
              gpus_per_run: int = 0, partition: str | None = None,
              time_limit_min: int = 60, wait: bool = True,
              report: bool = True, out=None) -> int:
  """launch.py on a sweep file: expands and checks it, then trains the runs
  named by `sweep_runs` (a task's process), prints the commands, or runs
  every unfinished task; returns the exit status (0: all finished, 1: some
  failed). Raises ConfigError for bad input, before any run starts."""
  out = out or sys.stdout
  fixed = command_overrides(argv)
  runs = expand(config, overrides, config_path, _overridden_fields(fixed))
  if folder is None:
    raise ConfigError(f'{config_path} is a sweep: give it a folder, '
                      '--workdir=runs/NAME')
  if parallel < 1:
    raise ConfigError(f'--parallel={parallel} is not allowed; it must be a '
                      'positive integer')
  if executor not in EXECUTORS:
    raise ConfigError(f'--executor={executor!r} is not allowed; choose one '
                      f'of {", ".join(EXECUTORS)}')
  by_name = {r.name: r for r in runs}
  if sweep_runs:
    unknown = [n for n in sweep_runs if n not in by_name]
    if unknown:
      raise ConfigError(f'--sweep_run={unknown[0]!r} is not a run of '
                        f'{config_path}')
    return train_task([by_name[n] for n in sweep_runs], folder, overwrite)

  _check_executor(executor)
  _check_runs(runs, folder)
  if not overwrite:
    _check_folder(runs, folder)
  tasks = group_tasks(runs, vmap_seeds)
  commands = {t.name: task_command(t, config_path, folder, fixed,
                                   overwrite=overwrite,
                                   vmap_seeds=vmap_seeds) for t in tasks}
  if emit_commands:
    for task in tasks:
      print(shlex.join(commands[task.name]), file=out)
    return 0
  write_sweep_file(folder, config_path, runs, fixed)
  todo = [t for t in tasks
          if not all(is_finished(r, folder) for r in t.runs)]
  skipped = len(tasks) - len(todo)
  grouped = (f' in {len(tasks)} tasks (seeds trained together)'
             if len(tasks) < len(runs) else '')
  where = {'local': f'{min(parallel, len(todo))} at a time here',
           'slurm': 'as SLURM jobs',
           'submitit_local': "through submitit's local executor",
           'inprocess': 'one after the other in this process'}[executor]
  print(f'sweep {folder}: {len(runs)} runs{grouped}; {skipped} task(s) '
        f'already finished, {len(todo)} to run, {where}; logs in '
        f'{folder / "logs"}', file=out, flush=True)
  start = time.monotonic()
  if executor in ('local', 'inprocess'):
    try:
      if executor == 'local':
        failures = run_pool(todo, commands, folder, parallel, gpus_per_run,
                            out=out)
      else:
        failures = run_in_process(todo, folder, overwrite, out=out)
    except KeyboardInterrupt:
      return 130
  else:
    failures = submit(todo, commands, folder,
                      'slurm' if executor == 'slurm' else 'local',
                      partition=partition, gpus_per_run=gpus_per_run,
                      time_limit_min=time_limit_min, parallel=parallel,
                      wait=wait or executor == 'submitit_local', out=out)
    if failures is None:  # Submitted to SLURM, not waited for.
      return 0
  finished = len(todo) - len(failures)
  print(f'sweep done in {format_duration(time.monotonic() - start)}: '
        f'{finished + skipped} of {len(tasks)} tasks finished, '
        f'{len(failures)} failed', file=out, flush=True)
  for name, why in failures.items():
    print(f'  failed: {name}: {why} (log: {folder / "logs" / name}.log)',
          file=out, flush=True)
  if report and finished + skipped:
    _report(folder, out)
  return 1 if failures else 0


def _check_executor(executor: str) -> None:
  """submitit installed, and SLURM's commands for --executor=slurm."""
  if executor in ('local', 'inprocess'):
    return
  if importlib.util.find_spec('submitit') is None:
    raise ConfigError(f'--executor={executor} needs submitit: pip install '
                      '"cnn_lab[slurm]" (submitit==1.5.4)')
  if executor == 'slurm':
    missing = [c for c in ('sbatch', 'srun') if not shutil.which(c)]
    if missing:
      raise ConfigError(
          f'--executor=slurm needs SLURM on this machine, and '
          f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} '
          "not on the PATH; run it on the cluster's login node, or use "
          '--emit_commands or --executor=submitit_local')


def _check_runs(runs: list[SweepRun], folder: pathlib.Path) -> None:
  """Every run's config passes the checks a run makes before it starts
  (train.validate_config), so that a bad value stops the sweep here."""
  from cnn_lab.train import validate_config
  for r in runs:
    try:
      validate_config(r.config, folder / r.name)
    except ConfigError as e:
      raise ConfigError(f'run {r.name}: {e}') from None


def _check_folder(runs: list[SweepRun], folder: pathlib.Path) -> None:
  """Refuses a sweep folder whose run folders hold runs of other configs
  (e.g. the sweep was launched there before with another budget): no run
  would start, each would refuse."""
  others = [(r, d) for r in runs if (d := other_config(r, folder))]
  if others:
    r, ((field, there, here), *_) = others[0]
    raise ConfigError(
        f'{folder} holds runs of another config ({len(others)} of '
        f'{len(runs)} runs; {r.name}: {field}: {there!r} there, {here!r} '
        'here). Choose another --workdir, or pass --overwrite to replace '
        'them')


def _report(folder: pathlib.Path, out) -> None:
  proc = subprocess.run([sys.executable, '-m', 'cnn_lab.report',
                         str(folder)], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  text = (proc.stdout + proc.stderr).strip()
  if proc.returncode:
    print(f'the report failed: {failure_reason(text, proc.returncode)}',
          file=out, flush=True)
  elif text:
    print(text, file=out, flush=True)
