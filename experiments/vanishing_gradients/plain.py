r"""The same nine activation-initialisation pairs on a deep plain net:
plain-20 (19 convolutions and a classifier) without batch norm, so that
nothing rescales the signal between the layers. A moderate constant
learning rate (0.02): the question is how the gradients reach the input
layers, not how fast the best pair trains.

Full scale (20 epochs):
  python launch.py --config=experiments/vanishing_gradients/plain.py \
      --workdir=runs/experiments/vanishing_gradients/plain
"""

from cnn_lab import sweeps
from configs import plain20


def get_config():
  config = plain20.get_config()
  config.name = 'vanishing_plain20'
  config.model.norm = 'none'  # Nothing rescales the signal.
  config.model.init_std = 0.01  # The small normal initialisation.
  config.optim.learning_rate = 0.02
  config.optim.schedule = 'constant'
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  return sweeps.product(
      sweeps.sweep('model.activation', ['sigmoid', 'tanh', 'relu']),
      sweeps.sweep('model.kernel_init', ['normal', 'glorot_uniform',
                                         'he_normal']))
