r"""AlexNet (torchvision's single-tower layout) on Fashion-MNIST padded to
32x32, which selects the small-input stem (5x5/1 first convolution; see
cnn_lab/models/alexnet.py).

  python launch.py --config=configs/alexnet.py
  python launch.py --config=configs/alexnet.py --config.model.activation=tanh
  python launch.py --config=configs/alexnet.py --config.data.image_size=224 \
      --config.data.resize=resize   # the ImageNet stem, on an accelerator

Training follows the paper (Sec. 5): SGD with momentum 0.9, weight decay
5e-4, learning rate 0.01 divided by 10 when progress stalls (here: at 50% and
75% of training), dropout 0.5. Weights start from He normal rather than the
paper's N(0, 0.01^2), which leaves this network stuck at chance for the
first epochs without the paper's hand-set biases of 1.
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'alexnet'
  config.model = config_dict.ConfigDict()
  config.model.name = 'alexnet'  # cnn_lab.models.alexnet.AlexNet.
  config.model.activation = 'relu'  # relu; tanh or sigmoid (saturating).
  config.model.dropout_rate = 0.5  # Before fc1 and fc2; in [0, 1).
  config.model.lrn = False  # Local response norm after conv1 and conv2.
  config.model.norm = 'none'  # 'batch': BN before each activation.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.kernel_init = 'he_normal'  # Paper: 'normal' with std 0.01.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.width = 1.0  # Channel and hidden-unit multiplier.
  config.model.head_features = (4096, 4096)  # Hidden fully connected layers.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.optim.schedule = 'step'  # /10 at 50% and 75% of training.
  return config
