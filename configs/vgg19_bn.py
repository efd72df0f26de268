r"""VGG19 with batch norm between every convolution and its ReLU; otherwise
the same run as vgg19_nobn.py.

  python launch.py --config=configs/vgg19_bn.py
"""

from configs import vgg19_nobn


def get_config():
  config = vgg19_nobn.get_config()
  config.name = 'vgg19_bn'
  config.model.norm = 'batch'
  return config
