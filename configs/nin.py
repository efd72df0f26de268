r"""Network in Network (the paper's CIFAR-10 network: three mlpconv blocks and
a global-average-pooling head) on Fashion-MNIST padded to 32x32.

  python launch.py --config=configs/nin.py
  python launch.py --config=configs/nin.py --config.model.dropout_rate=0.0

Lin et al. train with SGD, momentum 0.9, weight decay and dropout 0.5 between
the blocks. Without batch norm the network is slow to leave chance; the
learning rate warms up over the first 500 steps.
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'nin'
  config.model = config_dict.ConfigDict()
  config.model.name = 'nin'  # cnn_lab.models.nin.NiN.
  config.model.dropout_rate = 0.5  # After the first two mlpconv blocks.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.norm = 'none'  # 'batch': BN after every convolution.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.kernel_init = 'he_normal'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Multiplier of all but the class maps.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.optim.learning_rate = 0.05
  config.optim.weight_decay = 1e-4
  config.optim.warmup_steps = 500
  return config
