r"""plain20_diverge.py with the gradient's global L2 norm clipped to 1: the
same learning rate no longer blows up the network.

  python launch.py --config=configs/plain20_diverge_clip.py \
      --config.model.width=0.5 --config.train.num_steps=200
"""

from configs import plain20_diverge


def get_config():
  config = plain20_diverge.get_config()
  config.name = 'plain20_diverge_clip'
  config.optim.grad_clip_norm = 1.0  # Global-norm clipping (optax).
  return config
