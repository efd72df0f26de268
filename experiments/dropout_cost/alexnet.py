r"""Dropout on AlexNet's two hidden fully connected layers (the paper's 0.5,
and 0 to 0.7): stochastic training loss against the probe loss, and test
accuracy against the rate.

Full scale:
  python launch.py --config=experiments/dropout_cost/alexnet.py \
      --workdir=runs/experiments/dropout_cost/alexnet
"""

from cnn_lab import sweeps
from configs import alexnet


def get_config():
  config = alexnet.get_config()
  config.name = 'dropout_alexnet'
  return config


def get_sweep():
  return sweeps.sweep('model.dropout_rate', [0.0, 0.3, 0.5, 0.7])
