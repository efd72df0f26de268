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


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.name = 'vgg16_nobn'  # Run name: prefix of the default workdir.
  config.seed = 0  # Root of every random key and of the data order.

  config.model = config_dict.ConfigDict()
  config.model.name = 'vgg16'  # vgg11, vgg13, vgg16 or vgg19.
  config.model.norm = 'none'  # 'batch': BN between each conv and its ReLU.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.dropout_rate = 0.5  # Dropout after fc1 and fc2; in [0, 1).
  config.model.kernel_init = 'glorot_uniform'  # he_*, glorot_*, lecun_*, normal.
  config.model.init_std = 0.01  # Std of kernel_init='normal'.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.head_features = config_dict.placeholder(tuple)  # None: by size.
  config.model.conv_impl = 'auto'  # auto, xla or shifted (see layers.Conv).

  config.data = config_dict.ConfigDict()
  config.data.dataset = 'fashion_mnist'  # Any TFDS image dataset, or synthetic.
  config.data.data_dir = config_dict.placeholder(str)  # None: TFDS default.
  config.data.image_size = 32  # Model input; 28x28 images are padded to it.
  config.data.resize = 'auto'  # auto, pad or resize (bilinear).
  config.data.normalize = True  # Per-channel mean/std of the training split.
  config.data.random_crop = False  # Random crop after zero padding.
  config.data.crop_padding = 4  # Pixels of padding for random_crop.
  config.data.random_flip = False  # Random horizontal flip.

  config.optim = config_dict.ConfigDict()
  config.optim.name = 'sgd'  # sgd (with momentum), adam or adamw.
  config.optim.learning_rate = 0.01  # Peak learning rate.
  config.optim.momentum = 0.9  # SGD momentum (0: plain SGD).
  config.optim.nesterov = False  # Nesterov momentum for sgd.
  config.optim.weight_decay = 5e-4  # L2 on kernels (decoupled for adamw).
  config.optim.schedule = 'step'  # constant, cosine or step.
  config.optim.step_boundaries = (0.5, 0.75)  # Fractions of training (step).
  config.optim.step_factor = 0.1  # Multiplier at each boundary (step).
  config.optim.warmup_steps = 0  # Linear warm-up from 0 over these steps.
  config.optim.grad_clip_norm = 0.0  # Global-norm clipping; 0: off.

  config.train = config_dict.ConfigDict()
  config.train.batch_size = 256  # Examples per step.
  config.train.num_epochs = 30.0  # Length, unless num_steps is set.
  config.train.num_steps = config_dict.placeholder(int)  # Overrides epochs.

  config.log_every_steps = 50  # Metrics line and progress every N steps.
  config.eval_every_steps = 1000  # Test-split evaluation; 0: at the end only.
  config.eval_batch_size = 500  # Batch size of evaluation.
  config.eval_num_examples = config_dict.placeholder(int)  # None: whole split.
  return config
