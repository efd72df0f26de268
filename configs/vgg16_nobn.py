r"""VGG16 (configuration D) without batch norm on Fashion-MNIST padded to 32x32.

The full-length experiment, meant for an accelerator:
  python launch.py --config=configs/vgg16_nobn.py
A short CPU run (what the README's demo does):
  python launch.py --config=configs/vgg16_nobn.py --workdir=runs/vgg16_nobn \
      --config.train.num_steps=300 --config.train.batch_size=64

Optimiser settings follow Simonyan & Zisserman (2015), Sec. 3.1: SGD with
momentum 0.9, learning rate 1e-2 divided by 10 twice, L2 weight decay 5e-4,
dropout 0.5 in the first two fully connected layers, batch 256.
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'vgg16_nobn'
  config.model = config_dict.ConfigDict()
  config.model.name = 'vgg16'  # vgg11, vgg13, vgg16 or vgg19.
  config.model.norm = 'none'  # 'batch': BN between each conv and its ReLU.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.dropout_rate = 0.5  # Dropout after fc1 and fc2; in [0, 1).
  config.model.kernel_init = 'glorot_uniform'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Channel and hidden-unit multiplier.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.head_features = config_dict.placeholder(tuple)  # None: by size.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.optim.learning_rate = 0.01  # Divided by 10 at 50% and 75%.
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.train.batch_size = 256
  config.train.num_epochs = 30.0
  return config
