"""Training across processes (cnn_lab/distributed.py): two launch.py
processes on this machine, joined over 127.0.0.1 with CPU collectives
(gloo), 2 CPU devices each, against the same run in one process; and the
settings that start them."""

import socket

import pytest

from cnn_lab import distributed
from cnn_lab.errors import ConfigError
from test_devices import (TINY, assert_same_metrics, assert_same_state,
                          finish, launch, read_lines, read_state, train_here)

# Without per-layer statistics (tests/test_devices.py compares those): half
# the plots, a smaller step to compile. (Resuming the two processes from
# their checkpoint of step 2 gave the same lines to 1e-6, but another pair
# of processes costs ~18 s of CPU time: not in the suite.)
RUN = [*TINY, '--config.layer_stats=False']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_files(workdir) -> list[str]:
  """The files of a run folder but its checkpoints, TensorBoard's event
  files (named after the process that writes them) as 'events'."""
  return sorted(
      'tensorboard/events' if p.parent.name == 'tensorboard'
      else str(p.relative_to(workdir)) for p in workdir.rglob('*')
      if p.is_file() and 'checkpoints' not in p.relative_to(workdir).parts)


def launch_two(workdir) -> list:
  """Processes 0 and 1 of one run, started: [Popen]."""
  port = free_port()
  return [launch(workdir, *RUN, f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}', devices=2)
          for i in range(2)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The run in two processes, and meanwhile in this one: (folder,
  [(exit status, stdout, stderr)] of the two)."""
  base = tmp_path_factory.mktemp('multihost')
  procs = launch_two(base / 'two')
  try:
    train_here(base / 'single', RUN)
  finally:
    two = [finish(proc) for proc in procs]
  return base, two


def test_two_processes_match_one(runs):
  base, two = runs
  for status, _, err in two:
    assert status == 0, err
  lines = read_lines(base / 'two')
  assert [l['step'] for l in lines] == [1, 2, 3, 3]  # The last: eval.
  assert_same_metrics(lines, read_lines(base / 'single'))


def test_only_process_0_writes_and_prints(runs):
  base, two = runs
  # The files of one process: one TensorBoard writer, each line once.
  files = run_files(base / 'two')
  assert files == run_files(base / 'single')
  assert files.count('tensorboard/events') == 1
  assert 'metrics.jsonl' in files
  assert 'step 3/3' in two[0][1]
  assert two[1][1] == ''  # Process 1 prints nothing.


def test_checkpoint_of_both_processes(runs):
  """Both processes took part in saving (orbax), into one checkpoint that
  holds the whole state, the same as the single process's."""
  base, _ = runs
  folder = base / 'two' / 'checkpoints' / '3' / 'default'
  assert sorted(p.name for p in folder.glob('ocdbt.process_*')) == [
      'ocdbt.process_0', 'ocdbt.process_1']
  state = read_state(base / 'two', 3)
  assert int(state['step']) == 3
  assert_same_state(state, read_state(base / 'single', 3))


# --- the settings (no processes started) ---


SRUN = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]',
        'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}


def test_one_process_without_settings():
  assert distributed.resolve_settings(environ={}) is None
  assert distributed.resolve_settings(
      environ=SRUN | {'SLURM_NTASKS': '1'}) is None
  # An allocation's shell (no srun step): one process.
  assert distributed.resolve_settings(
      environ={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) is None


def test_cluster_job_left_to_jax():
  assert distributed.resolve_settings(
      environ=SRUN | {'SLURM_NTASKS': '4'}) == {}
  assert distributed.resolve_settings(environ={
      'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_MCA_orte_hnp_uri': 'x'}) == {}


def test_flags_then_environment():
  env = {'JAX_COORDINATOR_ADDRESS': 'host:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  assert distributed.resolve_settings(environ=env) == {
      'coordinator_address': 'host:1234', 'num_processes': 4,
      'process_id': 3}
  assert distributed.resolve_settings(process_id=1, environ=env) == {
      'coordinator_address': 'host:1234', 'num_processes': 4,
      'process_id': 1}


@pytest.mark.parametrize('kwargs, env, message', [
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), {},
     'process_id=2 is not allowed with num_processes=2; it must be an '
     'integer from 0 to 1'),
    (dict(coordinator_address='h:1', num_processes=0, process_id=0), {},
     'num_processes=0 is not allowed'),
    (dict(coordinator_address='h', num_processes=2, process_id=0), {},
     "coordinator_address='h' is not allowed; give HOST:PORT"),
    (dict(coordinator_address='h:99999', num_processes=2, process_id=0), {},
     "coordinator_address='h:99999' is not allowed"),
    (dict(num_processes=2), {},
     'a run of several processes needs all three of --coordinator_address, '
     '--num_processes and --process_id; missing: --coordinator_address '
     '(or JAX_COORDINATOR_ADDRESS), --process_id (or JAX_PROCESS_ID)'),
    ({}, {'JAX_PROCESS_ID': 'one'}, "JAX_PROCESS_ID='one' is not an integer"),
])
def test_bad_settings(kwargs, env, message):
  with pytest.raises(ConfigError) as error:
    distributed.resolve_settings(**kwargs, environ=env)
  assert str(error.value).startswith(message)
