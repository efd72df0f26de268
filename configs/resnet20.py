r"""ResNet-20 (He et al. 2016, Sec. 4.2: depth 6n+2, 16/32/64 channels, option
A shortcuts) on Fashion-MNIST padded to 32x32.

  python launch.py --config=configs/resnet20.py
  python launch.py --config=configs/resnet20.py --config.model.depth=110
  python launch.py --config=configs/plain20.py      # the same without shortcuts

Training follows the paper: SGD with momentum 0.9, weight decay 1e-4, batch
128, learning rate 0.1 divided by 10 at 50% and 75% of training (the paper's
32k and 48k of 64k iterations), random crops after 4-pixel padding.
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'resnet20'
  config.model = config_dict.ConfigDict()
  config.model.name = 'cifar_resnet'  # cnn_lab.models.resnet.CifarResNet.
  config.model.depth = 20  # 6n+2: 20, 32, 44, 56, 110, ...
  config.model.residual = True  # False: the paper's plain network.
  config.model.shortcut = 'A'  # A (zero-pad), B or C (1x1 projections).
  config.model.norm = 'batch'  # 'none': without batch norm.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.kernel_init = 'he_normal'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Channel multiplier.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.data.random_crop = True  # The paper's 4-pixel pad and random crop.
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'step'  # /10 at 50% and 75% of training.
  config.train.num_epochs = 20.0
  return config
