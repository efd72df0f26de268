r"""VGG16 with batch norm against without, at five learning rates; without
it both with the config's Glorot initialisation and with He's (the fair
rival of batch norm for a deep ReLU net). Gradient flow at initialisation
(step 1 is logged) and along training, test accuracy every few steps (steps
to a target), the largest learning rate that still trains, and batch norm's
train/eval gap (probe/bn_train_eval_gap).
Dropout is off, so that batch norm is the only difference between the pairs.

Full scale (30 epochs at full width; for accelerators):
  python launch.py --config=experiments/batch_norm/vgg16.py \
      --workdir=runs/experiments/batch_norm/vgg16
The CPU budget is `python -m cnn_lab.experiments run batch_norm`.
"""

from cnn_lab import sweeps
from configs import vgg16_bn


def get_config():
  config = vgg16_bn.get_config()
  config.name = 'batch_norm_vgg16'
  config.model.dropout_rate = 0.0  # Batch norm alone differs.
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  rates = sweeps.sweep('optim.learning_rate', [0.003, 0.01, 0.03, 0.1, 0.3])
  return sweeps.chain(
      sweeps.product(sweeps.sweep('model.norm', ['batch']),
                     sweeps.sweep('model.kernel_init', ['glorot_uniform']),
                     rates),
      sweeps.product(sweeps.sweep('model.norm', ['none']),
                     sweeps.sweep('model.kernel_init',
                                  ['glorot_uniform', 'he_normal']),
                     rates))
