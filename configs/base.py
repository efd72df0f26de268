r"""Fields every experiment shares: data, optimiser, length, logging.

Not an experiment itself: each family's config (lenet5.py, resnet20.py, ...)
starts from `base.get_config()` and sets its model and what its paper used.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.name = 'base'  # Run name: prefix of the default workdir.
  config.seed = 0  # Root of every random key and of the data order.

  config.model = config_dict.ConfigDict()  # Set by each family's config.

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
  config.optim.schedule = 'cosine'  # constant, cosine or step.
  config.optim.step_boundaries = (0.5, 0.75)  # Fractions of training (step).
  config.optim.step_factor = 0.1  # Multiplier at each boundary (step).
  config.optim.warmup_steps = 0  # Linear warm-up from 0 over these steps.
  config.optim.grad_clip_norm = 0.0  # Global-norm clipping; 0: off.

  config.train = config_dict.ConfigDict()
  config.train.batch_size = 128  # Examples per step.
  config.train.num_epochs = 10.0  # Length, unless num_steps is set.
  config.train.num_steps = config_dict.placeholder(int)  # Overrides epochs.
  config.train.aux_loss_weight = 0.3  # Auxiliary heads' loss (GoogLeNet).

  config.log_every_steps = 50  # Metrics line and progress every N steps.
  config.log_first_step = False  # Also log step 1: gradients at init.
  config.layer_stats = True  # Per-layer statistics, in logged steps only.
  config.probe_batch_size = 256  # Fixed training batch for probe/* losses.
  config.histogram_every_steps = 0  # TensorBoard histograms; 0: off.
  config.checkpoint_every_steps = 500  # Orbax checkpoint; 0: at the end only.
  config.checkpoint_keep = 3  # Newest checkpoints kept.
  config.on_nonfinite = 'halt'  # halt (exit 3) or skip the update.
  config.eval_every_steps = 1000  # Test-split evaluation; 0: at the end only.
  config.eval_batch_size = 500  # Batch size of evaluation.
  config.eval_num_examples = config_dict.placeholder(int)  # None: whole split.
  config.plots = True  # The run's figures in WORKDIR/plots at the end.
  return config
