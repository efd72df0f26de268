"""End to end through launch.py on real Fashion-MNIST, and bad input."""

import json
import os
import pathlib
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest

from cnn_lab import runs as runs_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config.train.num_steps=3', '--config.train.batch_size=8',
        '--config.log_every_steps=1', '--config.eval_every_steps=0',
        '--config.eval_num_examples=16', '--config.eval_batch_size=8',
        '--config.model.name=vgg11', '--config.model.width=0.25']


def launch(*args, cwd=ROOT):
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'launch.py'), *args], cwd=cwd,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=os.environ | {'PYTHONUNBUFFERED': '1'})


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
  """VGG11 at a quarter of its width (its 128-channel block4_conv2 takes
  Winograd's paths, the narrower layers oneDNN's) without and with batch
  norm, 3 steps each, run side by side."""
  base = tmp_path_factory.mktemp('runs')
  procs = {norm: launch('--config=configs/vgg16_nobn.py',
                        f'--workdir={base / norm}', *TINY,
                        f'--config.model.norm={norm}')
           for norm in ('none', 'batch')}
  for norm, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
  return base / 'none', base / 'batch', out


def test_run_writes_config_metrics_and_plot(two_runs):
  workdir, _, stdout = two_runs
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['name'] == 'vgg11'
  assert config['model']['num_classes'] == 10  # Resolved from the dataset.
  assert config['train']['num_steps'] == 3
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').open()]
  train = [l for l in lines if 'train/loss' in l]
  evals = [l for l in lines if 'eval/loss' in l]
  assert [l['step'] for l in train] == [1, 2, 3]
  assert [l['step'] for l in evals] == [3]
  assert 0 <= evals[0]['eval/accuracy'] <= 1
  layer_keys = [k for k in train[0] if k.startswith('grad_norm/')]
  assert layer_keys == ['grad_norm/global'] + [
      f'grad_norm/{n}' for n in (
          'block1_conv1', 'block2_conv1', 'block3_conv1', 'block3_conv2',
          'block4_conv1', 'block4_conv2', 'block5_conv1', 'block5_conv2',
          'fc1', 'fc2', 'fc3')]
  for line in train:
    assert all(np.isfinite(line[k]) and line[k] > 0 for k in layer_keys)
    assert np.isfinite(line['train/loss'])
  # The global norm is the root of the sum of squared layer norms.
  np.testing.assert_allclose(
      train[0]['grad_norm/global'],
      np.sqrt(sum(train[0][k]**2 for k in layer_keys[1:])), rtol=1e-4)
  png = matplotlib.image.imread(workdir / 'plots' / 'gradient_flow.png')
  assert png.shape[0] > 300 and (png[..., :3] < 0.5).mean() > 0.005
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert 'step 3/3' in stdout and 'img/s' in stdout and 'eta' in stdout


def test_batch_norm_run_logs_bn_layers(two_runs):
  _, workdir, _ = two_runs
  first = json.loads((workdir / 'metrics.jsonl').open().readline())
  keys = [k for k in first if k.startswith('grad_norm/block1')]
  assert keys == ['grad_norm/block1_conv1', 'grad_norm/block1_bn1']


def test_compare_plot(two_runs, tmp_path):
  nobn, bn, _ = two_runs
  out = tmp_path / 'cmp.png'
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_lab.plots', 'compare', str(nobn), str(bn),
       '--out', str(out)], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  png = matplotlib.image.imread(out)
  assert png.shape[1] > 1000 and (png[..., :3] < 0.5).mean() > 0.005
  labels = runs_lib.run_labels([runs_lib.RunFiles(nobn), runs_lib.RunFiles(bn)])
  assert labels == ['norm=none', 'norm=batch']


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_lab.plots', 'compare', str(tmp_path),
       '--out', str(tmp_path / 'x.png')], capture_output=True, text=True,
      cwd=ROOT)
  assert proc.returncode == 2
  assert 'is not a cnn_lab run' in proc.stderr


BAD_INPUTS = [
    (['--config.model.no_such_knob=1'], 'no_such_knob'),
    (['--config.model.name=vgg17'], "model.name='vgg17'"),
    (['--config.data.dataset=no_such_dataset'], 'no_such_dataset'),
    (['--config.model.dropout_rate=1.0'], r'model.dropout_rate=1.0'),
    (['--config.model.dropout_rate=-0.5'], r'model.dropout_rate=-0.5'),
    (['--config.optim.learning_rate=0'], 'optim.learning_rate=0'),
    (['--config.optim.learning_rate=-0.1'], 'optim.learning_rate=-0.1'),
    (['--config.train.batch_size=0'], 'train.batch_size=0'),
    (['--config.train.batch_size=-4'], 'train.batch_size=-4'),
    (['--config.train.num_steps=0'], 'train.num_steps=0'),
    (['--config.train.num_steps=-10'], 'train.num_steps=-10'),
    (['--config.train.num_steps=ten'], 'num_steps'),
    # Model-zoo combinations that cannot work, caught before compiling.
    (['--config=resnet20', '--config.model.depth=21'],
     r'model.depth=21 is not allowed for a CIFAR ResNet; it must be 6n+2'),
    (['--config=resnet18', '--config.model.depth=20'],
     'model.depth=20 is not allowed; choose one of 18, 34, 50, 101, 152'),
    (['--config=resnet20', '--config.model.width=0'], 'model.width=0'),
    (['--config=googlenet', '--config.model.width=-1.0'], 'model.width=-1'),
    (['--config.data.image_size=28'],
     'data.image_size=28 is too small for VGG'),
    (['--config=lenet5', '--config.data.image_size=16'],
     'data.image_size=16 is too small for lenet5'),
    (['--config=googlenet', '--config.model.branch5=7x7'],
     "model.branch5='7x7' is not allowed"),
    (['--config=resnet20', '--config.model.name=resnet21'],
     "model.name='resnet21' is not allowed"),
    (['--config=lenet5', '--config.histogram_every_steps=-5'],
     'histogram_every_steps=-5 is not allowed'),
    # Runs, optimisers and data that cannot work.
    (['--config.data.dataset=cifar10'],
     "data.dataset='cifar10' is not prepared"),
    (['--config.optim.name=rmsprop'], "optim.name='rmsprop'"),
    (['--config.optim.schedule=linear'], "optim.schedule='linear'"),
    (['--config.optim.learning_rate=nan'], 'optim.learning_rate=nan'),
    (['--config.optim.learning_rate=inf'], 'optim.learning_rate=inf'),
    (['--config=lenet5', '--config.train.batch_size=100000'],
     'train.batch_size=100000 is larger than the training split'),
    (['--config=lenet5', '--config.on_nonfinite=ignore'],
     "on_nonfinite='ignore' is not allowed"),
    (['--config=lenet5', '--config.checkpoint_every_steps=-1'],
     'checkpoint_every_steps=-1'),
    (['--config=lenet5', '--config.checkpoint_keep=0'], 'checkpoint_keep=0'),
    (['--config=lenet5', '--workdir=/dev/null/run'],
     'cannot create the workdir /dev/null/run'),
    (['--config=no_such_config'], 'no_such_config.py does not exist'),
]


def _digest(folder: pathlib.Path) -> dict:
  """Every file's bytes and every folder (None) below `folder`."""
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
          for p in sorted(folder.rglob('*'))}


def _existing_run(workdir: pathlib.Path) -> None:
  """A workdir that already holds (the files of) a run."""
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'checkpoints' / '4' / 'state').write_bytes(b'\x00' * 64)
  (workdir / 'config.json').write_text('{"name": "earlier"}\n')
  (workdir / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.3}\n')


@pytest.fixture(scope='module')
def bad_input_results(tmp_path_factory):
  """Every row of BAD_INPUTS through launch.py, three at a time (each
  launch is mostly Python start-up), each in a folder of its own: even rows
  into a new workdir, odd rows into one that holds a run already."""
  jobs = []
  for i, (args, _) in enumerate(BAD_INPUTS):
    cwd = tmp_path_factory.mktemp(f'bad{i}')
    workdir = cwd / 'run'
    if i % 2:
      _existing_run(workdir)
    config = 'vgg16_nobn'
    if args[0].startswith('--config='):
      config, args = args[0].split('=')[1], args[1:]
    jobs.append((cwd, workdir, [f'--config={ROOT}/configs/{config}.py',
                                f'--workdir={workdir}', *args]))
  results, running = [None] * len(jobs), {}
  before = {i: _digest(cwd) for i, (cwd, _, _) in enumerate(jobs)}
  for i, (cwd, _, argv) in enumerate(jobs):
    while len(running) >= 3:
      for j, proc in list(running.items()):
        if proc.poll() is not None:
          results[j] = (proc.returncode, proc.communicate()[1])
          del running[j]
      time.sleep(0.05)
    running[i] = launch(*argv, cwd=cwd)
  for j, proc in running.items():
    _, err = proc.communicate(timeout=300)
    results[j] = (proc.returncode, err)
  return [(cwd, workdir, before[i], *results[i])
          for i, (cwd, workdir, _) in enumerate(jobs)]


@pytest.mark.parametrize('row', range(len(BAD_INPUTS)),
                         ids=[str(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_written(row, bad_input_results):
  _, names = BAD_INPUTS[row]
  cwd, workdir, before, returncode, err = bad_input_results[row]
  lines = err.strip().splitlines()
  assert returncode == 2, err
  assert len(lines) == 1, err
  assert lines[0].startswith('error: ') and names in lines[0], err
  assert 'Traceback' not in err
  # Nothing written: a new workdir is not created, an existing one is left
  # byte for byte as it was, and nothing else appears.
  assert _digest(cwd) == before
  assert workdir.exists() == bool(row % 2) or '/dev/null' in err


def test_missing_config_file(tmp_path):
  proc = launch('--config=configs/nope.py', cwd=tmp_path)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
  assert 'nope.py' in err


@pytest.mark.parametrize('text,names', [
    ('def get_config(:\n', 'SyntaxError'),
    ('def get_config():\n  raise ValueError("boom")\n', 'ValueError: boom'),
])
def test_broken_config_file(text, names, tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text(text)
  proc = launch(f'--config={path}', cwd=tmp_path)
  _, err = proc.communicate(timeout=120)
  lines = err.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, err
  assert names in lines[0] and 'Traceback' not in err


def test_finished_run_launched_again_is_left_alone(two_runs):
  workdir = two_runs[0]
  before = (workdir / 'metrics.jsonl').read_bytes()
  proc = launch(f'--config={ROOT}/configs/vgg16_nobn.py',
                f'--workdir={workdir}', *TINY, '--config.model.norm=none')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert 'resumed from the checkpoint of step 3' in out
  assert 'the run was already complete (3 steps)' in out
  assert (workdir / 'metrics.jsonl').read_bytes() == before
