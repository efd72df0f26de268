"""cnn_lab.evaluate: a tiny LeNet-5 with batch norm, trained for a few steps
on synthetic data, evaluated with the moving averages and with each test
batch's own statistics, against the run's own log and a forward pass done
here by hand; bad input through the command line."""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnn_lab import data, evaluate, models, train
from configs import lenet5

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 40 test examples: the eval batch of 16 pads its last batch (8 of 16), and
# batch mode at 12 leaves 4 examples out.
TINY = {'data.dataset': 'synthetic', 'data.image_size': 28,
        'data.synthetic_shape': (28, 28, 1), 'data.synthetic_train': 64,
        'data.synthetic_test': 40, 'model.norm': 'batch', 'model.width': 0.5,
        'train.batch_size': 16, 'train.num_steps': 6, 'eval_batch_size': 16,
        'probe_batch_size': 16, 'layer_stats': False, 'log_every_steps': 0,
        'eval_every_steps': 0, 'checkpoint_every_steps': 0,
        'checkpoint_keep': 1}
BATCH_SIZES = (16, 12, 1)


def tiny_config():
  config = lenet5.get_config()
  for key, value in TINY.items():
    node = config
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config


def digest(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('evaluate') / 'run'
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def evaluated(run_dir):
  """Batch mode first, then the moving averages, at every batch size (one
  call, one state); then the moving averages alone (a fresh restore)."""
  before = digest(run_dir / 'checkpoints')
  lines = []
  both = evaluate.evaluate_run(run_dir, ('batch', 'moving'), BATCH_SIZES,
                               report=lines.append)
  moving = evaluate.evaluate_run(run_dir, ('moving',), (16,),
                                 out=run_dir / 'moving.json',
                                 report=lambda line: None)
  return {'both': both, 'moving': moving, 'lines': lines,
          'checkpoints_before': before}


def result(written, mode, batch_size) -> dict:
  (found,) = [r for r in written['results']
              if (r['mode'], r['batch_size']) == (mode, batch_size)]
  return found


def test_moving_mode_repeats_the_runs_own_evaluation(run_dir, evaluated):
  (logged,) = [l for l in map(json.loads, open(run_dir / 'metrics.jsonl'))
               if 'eval/accuracy' in l]
  assert logged['step'] == evaluated['both']['step'] == 6
  ours = result(evaluated['both'], 'moving', 16)
  assert ours['examples'] == 40  # All of them: padding is masked.
  assert abs(ours['accuracy'] - logged['eval/accuracy']) <= 1e-6
  assert abs(ours['loss'] - logged['eval/loss']) <= 1e-6 * logged['eval/loss']


def _checkpoint(run_dir: pathlib.Path) -> dict:
  """The arrays of the run's one checkpoint, read by orbax alone."""
  (folder,) = [p for p in (run_dir / 'checkpoints').iterdir()
               if p.name.isdigit()]
  return ocp.StandardCheckpointer().restore(folder / 'default')


def test_batch_mode_is_a_training_mode_forward_pass(run_dir, evaluated):
  config = json.loads((run_dir / 'config.json').read_text())
  model = models.create_model(**config['model'])
  test = data.make_datasets(**config['data']).test
  saved = _checkpoint(run_dir)
  variables = {'params': saved['params'], 'batch_stats': saved['batch_stats']}
  for batch_size in (16, 12):
    n = 40 // batch_size * batch_size
    batch = test.fixed_batch(n)
    logits = np.concatenate([
        model.apply(variables, batch['image'][i:i + batch_size], train=True,
                    mutable=['batch_stats'])[0]
        for i in range(0, n, batch_size)])
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss = -log_probs[np.arange(n), batch['label']].mean()
    accuracy = (logits.argmax(1) == batch['label']).mean()
    ours = result(evaluated['both'], 'batch', batch_size)
    assert ours['examples'] == n
    assert abs(ours['accuracy'] - accuracy) <= 1e-6
    np.testing.assert_allclose(ours['loss'], loss, rtol=1e-5)
    # After 6 steps the moving averages are far from any batch's statistics.
    assert abs(ours['loss'] - result(evaluated['both'], 'moving',
                                     batch_size)['loss']) > 1e-3
  assert any('4 examples left out' in l and 'batch' in l and '12' in l
             for l in evaluated['lines'])


def test_batch_mode_leaves_the_moving_averages_alone(run_dir, evaluated):
  assert (result(evaluated['both'], 'moving', 16)
          == result(evaluated['moving'], 'moving', 16))
  assert digest(run_dir / 'checkpoints') == evaluated['checkpoints_before']


def test_batch_of_one_collapses_the_dense_layers_to_their_bias(evaluated):
  # fc_bn1 normalises each unit over one example: its output is its bias,
  # whatever the image, so every prediction is the same class.
  labels = data.make_datasets(**tiny_config().data).test.labels[:40]
  ours = result(evaluated['both'], 'batch', 1)
  assert ours['examples'] == 40
  assert min(abs(ours['accuracy'] - np.mean(labels == c))
             for c in range(10)) <= 1e-6


def test_results_file_and_lines(run_dir, evaluated):
  written = json.loads((run_dir / 'inference.json').read_text())
  assert written == evaluated['both']
  assert [(r['mode'], r['batch_size']) for r in written['results']] == [
      (m, b) for b in BATCH_SIZES for m in ('batch', 'moving')]
  assert all(set(r) == {'mode', 'batch_size', 'examples', 'loss',
                        'accuracy'} for r in written['results'])
  result_lines = [l for l in evaluated['lines'] if 'accuracy' in l
                  and l.startswith(('batch', 'moving'))]
  assert len(result_lines) == 2 * len(BATCH_SIZES)


def test_cli_on_a_folder_that_is_not_a_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_lab.evaluate', str(tmp_path)],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count('\n') == 1
  assert proc.stderr.startswith('error: ') and 'not a cnn_lab run' in (
      proc.stderr)
  assert list(tmp_path.iterdir()) == []  # Nothing written.


@pytest.mark.parametrize('args, message', [
    (['--modes', 'moving,eval'], "mode 'eval' is unknown"),
    (['--batch_sizes', '8,0'], "'0' is not a positive integer"),
    (['--batch_sizes', '8,x'], "'x' is not a positive integer"),
    (['--batch_sizes', '41', '--modes', 'batch'], 'batch size 41 is larger'),
    ([], 'has no checkpoint'),
])
def test_bad_input_is_one_line_and_exit_2(args, message, run_dir, tmp_path,
                                          capsys):
  workdir = run_dir
  if message == 'has no checkpoint':
    workdir = tmp_path / 'run'
    workdir.mkdir()
    shutil.copy(run_dir / 'config.json', workdir)
  before = digest(workdir)
  assert evaluate.main([str(workdir), *args]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ')
  assert message in err
  assert digest(workdir) == before
