r"""ResNet-56: resnet20.py with n=9 blocks per stage.

  python launch.py --config=configs/resnet56.py
"""

from configs import resnet20


def get_config():
  config = resnet20.get_config()
  config.name = 'resnet56'
  config.model.depth = 56
  return config
