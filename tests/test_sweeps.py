"""Sweeps: the helpers, expansion and names, the checks before any run,
and whole sweeps through launch.py (process pool, skip, failure list,
submitit's local executor, emitted commands)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from ml_collections import config_dict

from cnn_lab import sweeps
from cnn_lab.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A LeNet-5 at half width, 4 steps of batch 8: a few seconds per run.
TINY_SWEEP = '''
from cnn_lab import sweeps
from configs import lenet5


def get_config():
  c = lenet5.get_config()
  c.name = 'tiny'
  c.train.num_steps = 4
  c.train.batch_size = 8
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.eval_num_examples = 16
  c.eval_batch_size = 8
  c.probe_batch_size = 8
  c.checkpoint_every_steps = 2
  c.model.width = 0.5
  return c


def get_sweep():
  return {body}
'''


def write_sweep(folder: pathlib.Path, body: str, name='tiny.py') -> str:
  path = folder / name
  path.write_text(TINY_SWEEP.format(body=body))
  return str(path)


def launch(*args, timeout=600):
  return subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), *args], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout,
      env=os.environ | {'PYTHONUNBUFFERED': '1'})


def base_config():
  c = config_dict.ConfigDict()
  c.seed = 0
  c.model = config_dict.ConfigDict({'norm': 'none', 'dropout_rate': 0.5,
                                    'name': 'vgg'})
  c.optim = config_dict.ConfigDict({'name': 'sgd', 'learning_rate': 0.1})
  c.data = config_dict.ConfigDict({'name': 'fashion_mnist'})
  c.lock()
  return c


# --- helpers and expansion ---


def test_product_zip_chain():
  a = sweeps.sweep('model.norm', ['batch', 'none'])
  b = sweeps.sweep('seed', range(3))
  grid = sweeps.product(a, b)
  assert len(grid) == 6
  assert grid[0] == {'model.norm': 'batch', 'seed': 0}
  assert grid[3] == {'model.norm': 'none', 'seed': 0}  # First one slowest.
  assert sweeps.zip(sweeps.sweep('optim.name', ['sgd', 'adam']),
                    sweeps.sweep('optim.learning_rate', [0.1, 1e-3])) == [
      {'optim.name': 'sgd', 'optim.learning_rate': 0.1},
      {'optim.name': 'adam', 'optim.learning_rate': 1e-3}]
  assert sweeps.chain(a, b) == a + b
  with pytest.raises(ConfigError, match='different lengths'):
    sweeps.zip(a, b)
  with pytest.raises(ConfigError, match='set twice'):
    sweeps.product(a, a)
  with pytest.raises(ConfigError, match='not a string'):
    sweeps.sweep('model.norm', 'batch')


def test_expand_names_runs_and_applies_overrides():
  base = base_config()
  runs = sweeps.expand(base, sweeps.product(
      sweeps.sweep('model.norm', ['none']),
      sweeps.sweep('model.dropout_rate', [0, 0.3]),
      sweeps.sweep('seed', [1])))
  assert [r.name for r in runs] == ['norm=none,dropout_rate=0.0,seed=1',
                                    'norm=none,dropout_rate=0.3,seed=1']
  assert runs[1].config.model.dropout_rate == 0.3
  assert runs[1].config.seed == 1
  # The int 0 became the field's float, so the name says 0.0.
  assert isinstance(runs[0].config.model.dropout_rate, float)
  assert base.model.dropout_rate == 0.5 and base.seed == 0  # Untouched.


def test_names_use_whole_fields_when_last_parts_clash():
  base = base_config()
  runs = sweeps.expand(base, sweeps.zip(
      sweeps.sweep('model.name', ['vgg', 'resnet']),
      sweeps.sweep('optim.name', ['sgd', 'adam'])))
  assert runs[1].name == 'model.name=resnet,optim.name=adam'
  assert sweeps.format_value(True) == 'true'
  assert sweeps.format_value((64, 32)) == '64x32'
  assert sweeps.format_value(1e-3) == '0.001'


@pytest.mark.parametrize('overrides, fixed, message', [
    ([], (), 'expands to no runs'),
    ([{'model.nrom': 'batch'}], (), "unknown config field 'model.nrom'"),
    ([{'model.norm': 'batch', 'optim.lr': 1}], (), "'optim.lr'"),
    ([{'seed': 'one'}], (), 'seed=.one.'),
    ([{'model.dropout_rate': 0.3}, {'model.dropout_rate': 0.30}], (),
     'two runs named'),
    ([{'seed': 0}, {'seed': 1}], ('seed',), 'set on the command line'),
    ([{'model.name': 'a/b'}], (), 'cannot be a folder name'),
])
def test_expand_refuses(overrides, fixed, message):
  with pytest.raises(ConfigError, match=message):
    sweeps.expand(base_config(), overrides, fixed=fixed)


def test_seeds_grouped_into_tasks_in_sweep_order():
  runs = sweeps.expand(base_config(), sweeps.product(
      sweeps.sweep('model.norm', ['batch', 'none']),
      sweeps.sweep('seed', [0, 1, 2])))
  tasks = sweeps.group_tasks(runs)
  assert [t.name for t in tasks] == ['norm=batch,seed={0,1,2}',
                                     'norm=none,seed={0,1,2}']
  assert [r.name for r in tasks[1].runs] == [
      f'norm=none,seed={s}' for s in range(3)]
  assert len(sweeps.group_tasks(runs, vmap_seeds=False)) == 6
  no_seed = sweeps.expand(base_config(),
                          sweeps.sweep('model.norm', ['batch', 'none']))
  assert [t.name for t in sweeps.group_tasks(no_seed)] == [
      'norm=batch', 'norm=none']


def test_tally_counts_and_estimates_on_a_fake_clock():
  now = [0.0]
  tally = sweeps.Tally(total=5, parallel=2, clock=lambda: now[0])
  tally.start('a')
  tally.start('b')
  assert tally.eta() is None and tally.left == 3
  now[0] = 10.0
  assert tally.end('a', ok=True) == 10.0
  tally.start('c')
  now[0] = 14.0
  assert tally.end('b', ok=False) == 14.0
  # Mean task 12 s; 2 not started (24 s), c has run 4 s of 12 (8 s left);
  # two slots: 16 s.
  assert tally.eta() == pytest.approx(16.0)
  assert tally.line().startswith(
      '[1 done, 1 running, 1 failed, 2 left | 0m14s so far, ~0m16s to go]')


def test_failure_reason_prefers_the_error_line():
  assert sweeps.failure_reason('x\nerror: bad thing\nmore', 2) == 'bad thing'
  assert sweeps.failure_reason(
      'Traceback:\n  File x\nValueError: boom\n', 1) == (
          'exit status 1: ValueError: boom')
  assert sweeps.failure_reason('', -9) == 'exit status -9, no output'


def test_finished_means_done_file_and_the_same_config(tmp_path):
  (run,) = sweeps.expand(base_config(), [{'seed': 3}])
  workdir = tmp_path / run.name
  workdir.mkdir()
  assert not sweeps.is_finished(run, tmp_path)
  written = run.config.to_dict()
  written['model']['num_classes'] = 10  # Resolved by the run: ignored.
  (workdir / 'config.json').write_text(json.dumps(written))
  assert not sweeps.is_finished(run, tmp_path)  # No done.json yet.
  sweeps.mark_finished(workdir, {'eval/accuracy': 0.5})
  assert sweeps.is_finished(run, tmp_path)
  assert sweeps.other_config(run, tmp_path) == []
  written['optim']['learning_rate'] = 0.2
  (workdir / 'config.json').write_text(json.dumps(written))
  assert not sweeps.is_finished(run, tmp_path)
  assert sweeps.other_config(run, tmp_path) == [
      ('optim.learning_rate', 0.2, 0.1)]


# --- bad input through launch.py: one line, exit 2, nothing written ---


@pytest.mark.parametrize('body, message', [
    ('[]', 'expands to no runs'),
    ("sweeps.sweep('model.activation', ['relu', 'relu'])", 'two runs named'),
    ("sweeps.sweep('model.actvation', ['relu', 'tanh'])",
     "unknown config field 'model.actvation'"),
    ("sweeps.sweep('model.width', [0.5, -1.0])",
     'run width=-1.0: model.width'),
])
def test_bad_sweep_refused_before_any_run(body, message, tmp_path):
  path = write_sweep(tmp_path, body)
  result = launch(f'--config={path}', f'--workdir={tmp_path / "out"}',
                  '--parallel=2')
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert message in lines[0]
  assert not (tmp_path / 'out').exists()


# --- whole sweeps ---


@pytest.fixture(scope='module')
def sweep_run(tmp_path_factory):
  """relu/tanh x seeds 0, 1 (two tasks of two seeds trained together) and
  a run whose learning rate makes it diverge, two tasks at a time."""
  base = tmp_path_factory.mktemp('sweep')
  path = write_sweep(base, """sweeps.chain(
      sweeps.product(sweeps.sweep('model.activation', ['relu', 'tanh']),
                     sweeps.sweep('seed', [0, 1])),
      [{'model.activation': 'relu', 'optim.learning_rate': 1e30,
        'seed': 0}])""")
  folder = base / 'out'
  first = launch(f'--config={path}', f'--workdir={folder}', '--parallel=2')
  again = launch(f'--config={path}', f'--workdir={folder}', '--parallel=2')
  return path, folder, first, again


def test_sweep_trains_every_run_into_its_folder(sweep_run):
  _, folder, first, _ = sweep_run
  assert first.returncode == 1, first.stdout + first.stderr  # One failed.
  listed = json.loads((folder / 'sweep.json').read_text())
  names = [r['name'] for r in listed['runs']]
  assert names[:4] == ['activation=relu,seed=0', 'activation=relu,seed=1',
                       'activation=tanh,seed=0', 'activation=tanh,seed=1']
  assert listed['fields'] == ['model.activation', 'seed',
                              'optim.learning_rate']
  for r in listed['runs'][:4]:
    workdir = folder / r['name']
    config = json.loads((workdir / 'config.json').read_text())
    assert config['seed'] == r['overrides']['seed']
    assert config['model']['activation'] == r['overrides'][
        'model.activation']
    steps = [json.loads(l)['step'] for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert max(steps) == 4
    done = json.loads((workdir / 'done.json').read_text())
    assert 0 <= done['eval/accuracy'] <= 1
  # Different seeds: different initial losses.
  first_loss = [json.loads((folder / n / 'metrics.jsonl').open().readline())
                ['train/loss'] for n in names[:2]]
  assert first_loss[0] != first_loss[1]


def test_sweep_lists_the_failure_and_goes_on(sweep_run):
  _, folder, first, _ = sweep_run
  out = first.stdout
  bad = 'activation=relu,learning_rate=1e+30,seed=0'
  assert f'FAILED {bad}' in out
  assert 'sweep done' in out and '2 of 3 tasks finished, 1 failed' in out
  (failed_line,) = [l for l in out.splitlines()
                    if l.startswith('  failed:')]
  assert failed_line.startswith(f'  failed: {bad}: the run diverged')
  assert not (folder / bad / 'done.json').exists()
  # Progress lines carry the running count.
  assert '[0 done, 2 running, 0 failed, 1 left |' in out


def test_sweep_launched_again_skips_finished_runs(sweep_run):
  _, folder, _, again = sweep_run
  assert '2 task(s) already finished, 1 to run' in again.stdout
  assert again.stdout.count('started ') == 1


def test_sweep_ends_in_its_report(sweep_run):
  _, folder, first, _ = sweep_run
  assert (folder / 'sweep.csv').exists(), first.stdout
  assert (folder / 'report.html').exists()


def test_emitted_commands_train_one_task_each(sweep_run, tmp_path):
  path, folder, _, _ = sweep_run
  result = launch(f'--config={path}', f'--workdir={tmp_path / "new"}',
                  '--emit_commands', '--config.train.num_steps=2')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  assert all('--config.train.num_steps=2' in l for l in lines)
  assert lines[0].count('--sweep_run=') == 2  # Two seeds together.
  assert not (tmp_path / 'new').exists()  # Printing writes nothing.


def test_submitit_local_executor_runs_real_jobs(tmp_path):
  pytest.importorskip('submitit')
  # Two seeds: one task, one job (the array's code path all the same).
  path = write_sweep(tmp_path, "sweeps.sweep('seed', [0, 1])")
  folder = tmp_path / 'out'
  result = launch(f'--config={path}', f'--workdir={folder}',
                  '--executor=submitit_local', '--config.train.num_steps=2')
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count('submitted ') == 1
  for name in ('seed=0', 'seed=1'):
    assert (folder / name / 'done.json').exists()
    steps = [json.loads(l)['step'] for l in
             (folder / name / 'metrics.jsonl').read_text().splitlines()]
    assert max(steps) == 2
  # submitit's own job folders: its pickled job and its output per job.
  jobs = folder / 'submitit'
  assert list(jobs.glob('*_submitted.pkl'))
  assert list(jobs.glob('*_0_log.out'))


def test_slurm_executor_submits_one_job_array(tmp_path):
  """`--executor=slurm` against stand-ins for SLURM's commands: `sbatch`
  keeps the script submitit wrote and answers as SLURM does. The script
  must carry the flags' partition, GPUs and time limit, one array task per
  sweep task at most --parallel at a time, and the tasks' commands must be
  in the pickled jobs."""
  pytest.importorskip('submitit')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text(
      '#!/bin/sh\ncp "$1" "$FAKE_SLURM/script.sh"\n'
      'echo "Submitted batch job 4242"\n')
  (bin_dir / 'srun').write_text('#!/bin/sh\nexit 1\n')
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  path = write_sweep(tmp_path, "sweeps.product(sweeps.sweep("
                     "'model.activation', ['relu', 'tanh', 'sigmoid']), "
                     "sweeps.sweep('seed', [0, 1]))")
  folder = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'launch.py'), f'--config={path}',
       f'--workdir={folder}', '--executor=slurm', '--slurm_partition=gpu',
       '--gpus_per_run=2', '--time_limit_min=90', '--parallel=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=os.environ | {'PATH': f'{bin_dir}:{os.environ["PATH"]}',
                        'FAKE_SLURM': str(tmp_path)})
  assert result.returncode == 0, result.stdout + result.stderr
  script = (tmp_path / 'script.sh').read_text()
  for line in ('#SBATCH --partition=gpu', '#SBATCH --gpus-per-node=2',
               '#SBATCH --time=90', '#SBATCH --array=0-2%2'):
    assert line in script, script
  assert [l.split(': job ')[1] for l in result.stdout.splitlines()
          if l.startswith('submitted ')] == ['4242_0', '4242_1', '4242_2']
  import pickle
  pickles = sorted((folder / 'submitit').glob('*_submitted.pkl'))
  assert len(pickles) == 3
  commands = []
  for p in pickles:
    with p.open('rb') as f:
      commands.append(' '.join(pickle.load(f).function.command))
  assert sum('--sweep_run=activation=tanh,seed=1' in c
             for c in commands) == 1
  assert all(c.count('--sweep_run=') == 2 for c in commands)
  assert 'python -m cnn_lab.report' in result.stdout
