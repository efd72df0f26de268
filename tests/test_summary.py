"""cnn_lab.summary: per-layer shapes, parameters and FLOPs, by hand and
through the command line."""

import pathlib
import subprocess
import sys

import pytest

from cnn_lab import models, summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lenet5_rows_by_hand():
  rows = summary.summarize(models.create_model(name='lenet5'), (28, 28, 1))
  assert [(r.name, r.output_shape, r.params) for r in rows] == [
      ('conv1', (28, 28, 6), 6 * 25 + 6),
      ('conv2', (10, 10, 16), 16 * 150 + 16),
      ('fc1', (120,), 400 * 120 + 120),
      ('fc2', (84,), 120 * 84 + 84),
      ('fc3', (10,), 84 * 10 + 10)]
  # Multiply-accumulates: every kernel weight once per output position.
  assert [r.macs for r in rows] == [28 * 28 * 6 * 25, 10 * 10 * 16 * 150,
                                    400 * 120, 120 * 84, 84 * 10]


def test_two_3x3_against_one_5x5_by_hand():
  # Same receptive field: 2 * 9 * C^2 against 25 * C^2 weights when the
  # channels stay C; BN-Inception's second 3x3 keeps the 5x5's outputs.
  def branch(knob):
    rows = summary.summarize(models.create_model(
        name='googlenet_paper', branch5=knob), (224, 224, 3))
    return {r.name: r for r in rows if r.name.startswith(
        'inception3a/branch3')}
  five, double = branch('5x5'), branch('3x3x2')
  assert five['inception3a/branch3/conv'].params == 25 * 16 * 32 + 32
  assert double['inception3a/branch3_a/conv'].params == 9 * 16 * 32 + 32
  assert double['inception3a/branch3_b/conv'].params == 9 * 32 * 32 + 32
  assert double['inception3a/branch3_b/conv'].output_shape == (28, 28, 32)


def test_group_rows_sums_blocks():
  rows = summary.summarize(models.create_model(name='resnet20'), (32, 32, 3))
  groups = {g.name: g for g in summary.group_rows(rows)}
  assert list(groups)[:3] == ['conv1', 'bn1', 'stage1_block1']
  assert sum(g.params for g in groups.values()) == sum(r.params for r in rows)
  # A 16-channel basic block: two 3x3x16x16 kernels and two batch norms.
  assert groups['stage1_block1'].params == 2 * 9 * 16 * 16 + 4 * 16
  assert groups['stage3_block3'].output_shape == (8, 8, 64)


def cli(*args):
  return subprocess.run([sys.executable, '-m', 'cnn_lab.summary', *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_model_and_config():
  proc = cli('--model=lenet5', '--num_classes=10', '--input_shape=28,28,1')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[-1] == 'total_params: 61706'
  assert any(l.split()[:2] == ['conv2', '10x10x16'] for l in lines)
  # A config's model on its dataset: ResNet-20 on 1-channel 32x32 images.
  proc = cli('--config=configs/resnet20.py')
  assert proc.returncode == 0, proc.stderr
  expected = 269_722 - 2 * 9 * 16  # The stem sees 1 channel, not 3.
  assert proc.stdout.strip().splitlines()[-1] == f'total_params: {expected}'


def test_cli_compare_reductions():
  proc = cli('--model=googlenet', '--compare=googlenet_no_reduction')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  a = sum(r.params for r in summary.summarize(
      models.create_model(name='googlenet'), (224, 224, 3)))
  b = sum(r.params for r in summary.summarize(
      models.create_model(name='googlenet', reduction=False), (224, 224, 3)))
  assert lines[-1] == f'total_params: {a} {b}'
  row = next(l for l in lines if l.startswith('inception4a '))
  assert row.split()[1:3] == [f'{364_512:,}', f'{1_229_824:,}']


@pytest.mark.parametrize('args,message', [
    (['--model=resnet21'], "model.name='resnet21'"),
    (['--model=resnet20', '--input_shape=32,32'], '--input_shape'),
    (['--model=resnet20', '--knob=width'], '--knob'),
    (['--model=resnet20', '--knob=width=0'], 'model.width=0'),
    (['--model=vgg16', '--input_shape=28,28,1'], 'data.image_size=28'),
    (['--config=configs/nope.py'], 'does not exist'),
    ([], 'exactly one of'),
    (['--model=resnet20', '--knob=name=vgg11'], '--num_classes'),
    (['--model=resnet20', '--knob=num_classes=3'], '--num_classes'),
    (['--model=alexnet', '--knob=head_features=4096'], 'model.head_features'),
    (['--model=alexnet', '--knob=head_features=None'], 'model.head_features'),
    (['--model=resnet20', '--knob=width={[1]:2}'], 'cannot read'),
    (['--config=configs/base.py'], 'sets no model.name'),
    (['--model=lenet5', '--knob=kernel_init=normal', '--knob=init_std=1e999'],
     'model.init_std=inf'),
])
def test_cli_bad_input(args, message):
  proc = cli(*args)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
