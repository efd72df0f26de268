r"""Batch norm against none, times three dropout rates, three seeds each: 18
runs of VGG16 (configs/vgg16_bn.py; only model.norm, model.dropout_rate
and seed vary).

The full-length sweep, meant for accelerators:
  python launch.py --config=configs/sweeps/vgg16_bn_dropout.py \
      --workdir=runs/vgg16_bn_dropout
A small CPU budget (VGG16 at a quarter of its width, 100 steps; the seeds
of each setting train together, two settings at a time):
  python launch.py --config=configs/sweeps/vgg16_bn_dropout.py \
      --workdir=runs/vgg16_bn_dropout --parallel=2 \
      --config.model.width=0.25 --config.train.num_steps=100 \
      --config.train.batch_size=64 --config.eval_num_examples=2000
Then `python -m cnn_lab.report runs/vgg16_bn_dropout` (the sweep runs it
at the end) tables and plots the runs.
"""

from cnn_lab import sweeps
from configs import vgg16_bn


def get_config():
  config = vgg16_bn.get_config()
  config.name = 'vgg16_bn_dropout'
  return config


def get_sweep():
  return sweeps.product(
      sweeps.sweep('model.norm', ['batch', 'none']),
      sweeps.sweep('model.dropout_rate', [0.0, 0.3, 0.5]),
      sweeps.sweep('seed', [0, 1, 2]))
