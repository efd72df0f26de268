r"""VGG13 with batch norm between every convolution and its ReLU; otherwise
the same run as vgg13_nobn.py.

  python launch.py --config=configs/vgg13_bn.py
"""

from configs import vgg13_nobn


def get_config():
  config = vgg13_nobn.get_config()
  config.name = 'vgg13_bn'
  config.model.norm = 'batch'
  return config
