r"""The degradation problem (He et al. 2016, Fig. 1 and 6): plain-20 and
plain-56 against ResNet-20 and ResNet-56 (shortcut A, zero-padding),
and the two ResNets again with shortcut B (1x1 projections where the shape
changes). All with batch norm, as in the paper.

Full scale (20 epochs each; for accelerators):
  python launch.py --config=experiments/degradation/resnets.py \
      --workdir=runs/experiments/degradation/resnets
"""

from cnn_lab import sweeps
from configs import resnet20


def get_config():
  config = resnet20.get_config()
  config.name = 'degradation'
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  return sweeps.chain(
      sweeps.product(sweeps.sweep('model.depth', [20, 56]),
                     sweeps.sweep('model.residual', [False])),
      sweeps.product(sweeps.sweep('model.depth', [20, 56]),
                     sweeps.sweep('model.residual', [True]),
                     sweeps.sweep('model.shortcut', ['A', 'B'])))
