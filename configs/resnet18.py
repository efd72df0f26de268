r"""ResNet-18 (the ImageNet network of He et al. 2016, Table 1) on
Fashion-MNIST padded to 32x32, which selects the small-input stem (3x3/1
convolution, no max-pool; see cnn_lab/models/resnet.py).

  python launch.py --config=configs/resnet18.py
  python launch.py --config=configs/resnet18.py --config.model.depth=34
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'resnet18'
  config.model = config_dict.ConfigDict()
  config.model.name = 'resnet'  # cnn_lab.models.resnet.ResNet.
  config.model.depth = 18  # 18, 34 (basic blocks), 50, 101, 152 (bottleneck).
  config.model.residual = True  # False: the paper's plain network.
  config.model.shortcut = 'B'  # A (zero-pad), B or C (1x1 projections).
  config.model.bottleneck_stride = '1x1'  # 1x1 (paper) or 3x3 (torchvision).
  config.model.norm = 'batch'  # 'none': without batch norm.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.kernel_init = 'he_normal'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Channel multiplier.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.data.random_crop = True  # 4-pixel pad and random crop.
  config.optim.learning_rate = 0.1
  config.optim.weight_decay = 1e-4
  return config
