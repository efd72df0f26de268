r"""VGG19 without batch norm; otherwise the same run as vgg16_nobn.py.

  python launch.py --config=configs/vgg19_nobn.py
"""

from configs import vgg16_nobn


def get_config():
  config = vgg16_nobn.get_config()
  config.name = 'vgg19_nobn'
  config.model.name = 'vgg19'
  return config
