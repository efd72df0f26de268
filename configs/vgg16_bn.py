r"""VGG16 with batch norm between every convolution and its ReLU; otherwise
the same run as vgg16_nobn (`diff` the two files to see the ablation).

  python launch.py --config=configs/vgg16_bn.py
"""

from configs import vgg16_nobn


def get_config():
  config = vgg16_nobn.get_config()
  config.name = 'vgg16_bn'
  config.model.norm = 'batch'
  return config
