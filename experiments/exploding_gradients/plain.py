r"""Exploding gradients on plain-20 without batch norm. The baseline's
learning rate (0.02) trains; at 0.1 (five times it) the updates blow up
once and leave the top layers dead (finite, but at chance); at 1.0 and with
a large initialisation (normal, std 0.5: some four times He's std for 3x3x16
inputs, a gain of about 4 per layer) it goes non-finite. Global-norm
clipping (to 1) or batch norm is added to each. With on_nonfinite='halt' a
diverging run stops and its metrics name the step and the first layer that
went non-finite.

Full scale (20 epochs):
  python launch.py --config=experiments/exploding_gradients/plain.py \
      --workdir=runs/experiments/exploding_gradients/plain
"""

from cnn_lab import sweeps
from configs import plain20


def get_config():
  config = plain20.get_config()
  config.name = 'exploding_plain20'
  config.model.norm = 'none'
  config.optim.learning_rate = 0.02  # The baseline's; it trains.
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  config.log_first_step = True  # The gradients at initialisation.
  return config


def get_sweep():
  fixes = sweeps.chain(
      [{}],  # Neither.
      sweeps.sweep('optim.grad_clip_norm', [1.0]),
      sweeps.sweep('model.norm', ['batch']))
  return sweeps.chain(
      [{'optim.learning_rate': 0.02}],  # The baseline.
      sweeps.product(sweeps.sweep('optim.learning_rate', [0.1, 1.0]), fixes),
      sweeps.product(sweeps.sweep('model.kernel_init', ['normal']),
                     sweeps.sweep('model.init_std', [0.5]), fixes))
