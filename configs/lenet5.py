r"""LeNet-5 in its modern form (ReLU, max pooling) on Fashion-MNIST at 28x28.

  python launch.py --config=configs/lenet5.py

61,706 parameters; about a minute per epoch on a 2-core CPU. The classic form
(tanh, average pooling) is configs/lenet5_classic.py.
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'lenet5'
  config.model = config_dict.ConfigDict()
  config.model.name = 'lenet5'  # cnn_lab.models.lenet.LeNet5.
  config.model.activation = 'relu'  # relu (modern); tanh or sigmoid (classic).
  config.model.pool = 'max'  # max (modern) or avg (classic subsampling).
  config.model.norm = 'none'  # 'batch': BN before each activation.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.dropout_rate = 0.0  # After fc1 and fc2 (paper: none).
  config.model.kernel_init = 'lecun_uniform'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Channel and hidden-unit multiplier.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.data.image_size = 28  # The first convolution pads by 2.
  config.optim.learning_rate = 0.05  # SGD with momentum 0.9, cosine decay.
  config.optim.weight_decay = 1e-4
  return config
