r"""A run that diverges on purpose: Plain-20 (plain20.py) without batch norm,
SGD at a constant learning rate of 1.0 (ten times the paper's, no warm-up).
Within some 10-20 steps the loss explodes (1e27 at width 0.5, batch 32)
and the gradients' global norm overflows, then the activations; with the
default `on_nonfinite='halt'` the run stops with exit status 3, keeping its
last good checkpoint.
`plain20_diverge_clip.py` is the same run with global-norm gradient
clipping, and survives.

  python launch.py --config=configs/plain20_diverge.py \
      --config.model.width=0.5 --config.train.num_steps=200
"""

from configs import plain20


def get_config():
  config = plain20.get_config()
  config.name = 'plain20_diverge'
  config.model.norm = 'none'  # No batch norm to keep activations in range.
  config.optim.learning_rate = 1.0  # Ten times the paper's 0.1.
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  return config
