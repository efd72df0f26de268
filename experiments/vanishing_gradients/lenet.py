r"""Glorot & Bengio (2010) on LeNet-5 classic (tanh, average pooling):
sigmoid, tanh and ReLU, each with a small normal initialisation
(std 0.01), Glorot's uniform one and He's normal one. Step 1 is logged: the
per-layer gradient norms at initialisation; act_saturated/fc2_act is the
top hidden layer's saturation along training.

Full scale (10 epochs):
  python launch.py --config=experiments/vanishing_gradients/lenet.py \
      --workdir=runs/experiments/vanishing_gradients/lenet
"""

from cnn_lab import sweeps
from configs import lenet5_classic


def get_config():
  config = lenet5_classic.get_config()
  config.name = 'vanishing_lenet'
  config.model.init_std = 0.01  # The small normal initialisation.
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  return sweeps.product(
      sweeps.sweep('model.activation', ['sigmoid', 'tanh', 'relu']),
      sweeps.sweep('model.kernel_init', ['normal', 'glorot_uniform',
                                         'he_normal']))
