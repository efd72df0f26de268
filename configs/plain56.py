r"""Plain-56: resnet56.py without its shortcuts. In the paper (Fig. 6 left)
it trains to a higher training error than plain-20: the degradation problem.

  python launch.py --config=configs/plain56.py
"""

from configs import resnet56


def get_config():
  config = resnet56.get_config()
  config.name = 'plain56'
  config.model.residual = False
  return config
