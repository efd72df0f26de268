r"""GoogLeNet's design choices trained at one budget: the 1x1 reductions
before the 3x3 and 5x5 convolutions (on, off), the fifth branch as one 5x5
(the paper), one 3x3 (torchvision, the config's default) or two stacked 3x3,
and the global-average-pool head against a flattening fully connected one.
Each run changes one choice from the config's default.

Full scale:
  python launch.py --config=experiments/one_by_one/googlenet.py \
      --workdir=runs/experiments/one_by_one/googlenet
"""

from cnn_lab import sweeps
from configs import googlenet


def get_config():
  config = googlenet.get_config()
  config.name = 'one_by_one_googlenet'
  return config


def get_sweep():
  return sweeps.chain(
      sweeps.sweep('model.reduction', [True]),  # The default.
      sweeps.sweep('model.reduction', [False]),
      sweeps.sweep('model.branch5', ['5x5', '3x3x2']),
      sweeps.sweep('model.head', ['fc']))
