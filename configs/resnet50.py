r"""ResNet-50 (bottleneck blocks) on Fashion-MNIST padded to 32x32; otherwise
the same run as resnet18.py.

  python launch.py --config=configs/resnet50.py
"""

from configs import resnet18


def get_config():
  config = resnet18.get_config()
  config.name = 'resnet50'
  config.model.depth = 50
  return config
