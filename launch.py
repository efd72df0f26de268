r"""Trains one config:

  python launch.py --config=configs/vgg16_nobn.py [--workdir=DIR] \
      [--config.train.num_steps=200 --config.model.dropout_rate=0.3 ...]

Any config field can be overridden with --config.<field>=<value>. Without
--workdir a new folder under runs/ is used (printed at the start). A run
uses every local device; over several hosts, run it on each with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I
(cnn_lab/distributed.py).
Exit status: 0 done; 2 invalid config, flag or input (one line on stderr).

A config file that also defines get_sweep() is a sweep (cnn_lab/sweeps.py):

  python launch.py --config=configs/sweeps/vgg16_bn_dropout.py \
      --workdir=runs/NAME [--parallel=2 | --executor=slurm | --emit_commands]

trains every run of it into runs/NAME/<run name>/ and ends with its report
(exit status 1 when a run failed).
"""

import os
import pathlib
import sys

if __name__ == '__main__':
  # Before JAX starts: tcmalloc, or malloc on huge pages (cnn_lab/malloc.py).
  from cnn_lab.malloc import reexec_with_fast_malloc
  reexec_with_fast_malloc()

# Quiet TensorFlow's C++ start-up chatter (it is only used by TFDS/TensorBoard).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnn_lab import sweeps  # noqa: E402  (no JAX: it imports jax lazily)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file defining get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for metrics, plots and TensorBoard files '
    '(default: runs/<name>-<time>). A workdir holding a run of the same '
    'config resumes it from its latest checkpoint.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete the run in --workdir if it was made with '
    'another config (otherwise that is refused).')

# Several hosts (cnn_lab/distributed.py): all three, or none.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Several processes: HOST:PORT of process '
    "0's coordinator (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Several processes: how many (default: '
    '$JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Several processes: this one, 0 to num_processes - 1 '
    '(default: $JAX_PROCESS_ID).')

# Sweeps: a config file with get_sweep() (cnn_lab/sweeps.py).
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Sweep: tasks run at a time on this machine, each in its '
    "own process (the machine's CPUs are split between them).")
_EXECUTOR = flags.DEFINE_enum(
    'executor', 'local', ['local', 'slurm', 'submitit_local', 'inprocess'],
    'Sweep: local (a process pool here), slurm (one job per task through '
    "submitit), submitit_local (submitit's local executor) or inprocess "
    '(the tasks one after the other in this process: no start-up each).')
_EMIT_COMMANDS = flags.DEFINE_bool(
    'emit_commands', False, 'Sweep: print one launch command per task and '
    'exit (run them anywhere, in any order).')
_SWEEP_RUN = flags.DEFINE_multi_string(
    'sweep_run', [], 'Sweep: train only this run (by name; repeat it for '
    'seeds trained together). What each task process is given.')
_VMAP_SEEDS = flags.DEFINE_bool(
    'vmap_seeds', True, 'Sweep: train the runs that differ only in seed '
    'together, vmapped in one program.')
_GPUS_PER_RUN = flags.DEFINE_integer(
    'gpus_per_run', 0, 'Sweep: GPUs of each task (local: its share of '
    'CUDA_VISIBLE_DEVICES; slurm: gpus per job); 0: leave them alone.')
_PARTITION = flags.DEFINE_string('slurm_partition', None,
                                 'Sweep, slurm: the partition.')
_TIME_LIMIT = flags.DEFINE_integer(
    'time_limit_min', 60, 'Sweep, slurm/submitit: time limit of each job, '
    'in minutes.')
_SWEEP_REPORT = flags.DEFINE_bool(
    'sweep_report', True, 'Sweep: end with the HTML report of its finished '
    'runs (python -m cnn_lab.report).')
_WAIT = flags.DEFINE_bool(
    'wait', False, 'Sweep, slurm: wait for the jobs and report on them '
    '(submitit_local always waits).')


def fail(message: str, status: int = 2) -> None:
  """One line on stderr, exit status 2: the contract for bad input (3: the
  run diverged under on_nonfinite=halt)."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(status)


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_field_message(argv, path: str) -> str | None:
  """Names the first --config.<field> override that the config lacks."""
  import importlib.util
  try:
    spec = importlib.util.spec_from_file_location('_cnn_lab_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # The file itself is broken: reported elsewhere.
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node, parts = config, arg[len('--config.'):].split('=', 1)[0].split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(parts[:i]) or 'the config'
        fields = ', '.join(node.keys()) if hasattr(node, 'keys') else ''
        return (f'unknown config field {".".join(parts)!r} in {arg.split("=")[0]}: '
                f'{where} has the fields {fields}')
      node = node[part]
  return None


def parse_flags(argv):
  """Parses flags and loads the config; every failure is one line, exit 2."""
  path = _config_path(argv)
  if path is None:
    fail('--config=configs/NAME.py is required')
  if not os.path.isfile(path):
    fail(f'config file {path} does not exist')
  try:
    flags.FLAGS(argv)
    _ = _CONFIG.value  # config_flags defers some load errors to here.
  except flags.Error as e:
    text = str(e)
    if 'Traceback' in text:  # get_config() raised: keep its last line.
      last = [l for l in text.splitlines() if l.strip()][-1].strip()
      fail(f'get_config() of {path} failed: {last}')
    fail(text)
  except (AttributeError, KeyError) as e:
    fail(_unknown_field_message(argv, path) or
         f'cannot load the config {path} ({type(e).__name__}: {e})')
  except Exception as e:  # Raised while loading the config file.
    cause = e.__cause__ or e
    fail(f'cannot load the config {path} ({type(cause).__name__}: {cause})')


def main(argv):
  parse_flags(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from cnn_lab.errors import ConfigError

  def run_sweep(overrides):
    return sweeps.run_sweep(
        _CONFIG.value, _config_path(argv), overrides,
        pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None, argv,
        parallel=_PARALLEL.value, executor=_EXECUTOR.value,
        emit_commands=_EMIT_COMMANDS.value, sweep_runs=_SWEEP_RUN.value,
        vmap_seeds=_VMAP_SEEDS.value, overwrite=_OVERWRITE.value,
        gpus_per_run=_GPUS_PER_RUN.value, partition=_PARTITION.value,
        time_limit_min=_TIME_LIMIT.value, wait=_WAIT.value,
        report=_SWEEP_REPORT.value)

  try:  # A sweep's own checks come before JAX is imported.
    sweep = sweeps.load_sweep(_config_path(argv))
    if sweep is not None and not _SWEEP_RUN.value:
      sys.exit(run_sweep(sweep))  # Expands it and runs its tasks.
  except ConfigError as e:
    fail(e)
  from cnn_lab.train import Diverged, train_and_evaluate
  try:
    if sweep is not None:  # One task of a sweep (--sweep_run).
      sys.exit(run_sweep(sweep))
    from cnn_lab import distributed
    num_processes = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if num_processes > 1 and not distributed.is_main():
      # Process 0 prints the progress; the others nothing (C++ included).
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)
  except ConfigError as e:
    fail(e)
  except Diverged as e:
    fail(e, status=3)
  except PermissionError as e:
    fail(f'cannot write the workdir: {e}')


if __name__ == '__main__':
  main(sys.argv)
