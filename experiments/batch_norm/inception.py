r"""GoogLeNet with batch norm after every convolution (the BN-Inception
variant of Ioffe & Szegedy 2015, on GoogLeNet's layers) against the
original without, at the config's learning rate and five times it (the
paper's first change to BN-Inception's training was a larger rate).

Full scale:
  python launch.py --config=experiments/batch_norm/inception.py \
      --workdir=runs/experiments/batch_norm/inception
"""

from cnn_lab import sweeps
from configs import googlenet


def get_config():
  config = googlenet.get_config()
  config.name = 'batch_norm_inception'
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  return sweeps.product(
      sweeps.sweep('model.norm', ['batch', 'none']),
      sweeps.sweep('optim.learning_rate', [0.05, 0.25]))
