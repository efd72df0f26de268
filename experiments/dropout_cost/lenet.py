r"""Dropout before and after LeNet-5's hidden fully connected layers (fc1,
fc2; rates 0 to 0.7): the stochastic training loss (a new mask each step)
against the deterministic probe loss (a fixed training batch, dropout off),
the monotonic-cost check with dropout off and then on, and test accuracy
against the rate. LeNet-5 modern (ReLU, max pool); the paper had no dropout.

Full scale (10 epochs):
  python launch.py --config=experiments/dropout_cost/lenet.py \
      --workdir=runs/experiments/dropout_cost/lenet
"""

from cnn_lab import sweeps
from configs import lenet5


def get_config():
  config = lenet5.get_config()
  config.name = 'dropout_lenet'
  return config


def get_sweep():
  return sweeps.sweep('model.dropout_rate', [0.0, 0.3, 0.5, 0.7])
