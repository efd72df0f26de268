r"""VGG11 with batch norm between every convolution and its ReLU; otherwise
the same run as vgg11_nobn.py.

  python launch.py --config=configs/vgg11_bn.py
"""

from configs import vgg11_nobn


def get_config():
  config = vgg11_nobn.get_config()
  config.name = 'vgg11_bn'
  config.model.norm = 'batch'
  return config
