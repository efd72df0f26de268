r"""GoogLeNet (Inception v1, torchvision's layout: batch norm after every
convolution) on Fashion-MNIST padded to 32x32, which keeps inception3 at
32x32 (the small-input stem; see cnn_lab/models/googlenet.py).

  python launch.py --config=configs/googlenet.py
  python launch.py --config=configs/googlenet_no_reduction.py   # ablation
  python launch.py --config=configs/googlenet.py --config.model.width=0.25 \
      --config.train.num_steps=200    # a short CPU run

Heavy for a CPU at full width (2.9 GFLOPs, 1.45 G multiply-adds, per 32x32
image forward); use the width multiplier there. The paper's version of every knob is
`--config.model.name=googlenet_paper` (no BN, 5x5 branch, auxiliary heads).
"""

from ml_collections import config_dict

from configs import base


def get_config() -> config_dict.ConfigDict:
  config = base.get_config()
  config.name = 'googlenet'
  config.model = config_dict.ConfigDict()
  config.model.name = 'googlenet'  # cnn_lab.models.googlenet.GoogLeNet.
  config.model.reduction = True  # 1x1 reductions before the 3x3 and 5x5.
  config.model.branch5 = '3x3'  # 5x5 (paper), 3x3 (torchvision) or 3x3x2.
  config.model.aux_heads = False  # Two auxiliary classifiers (training only).
  config.model.head = 'gap'  # gap (global average pool) or fc (flatten).
  config.model.norm = 'batch'  # 'none': the paper's network without BN.
  config.model.bn_momentum = 0.9  # Old value's weight in BN's averages.
  config.model.activation = 'relu'  # relu, tanh or sigmoid.
  config.model.dropout_rate = 0.2  # Before the classifier (paper: 0.4).
  config.model.lrn = False  # The paper's two local response norms (stem).
  config.model.pool4 = 2  # Window of the pool before stage 5 (paper: 3).
  config.model.aux_pool = 'adaptive'  # Aux heads' pool: adaptive or paper.
  config.model.kernel_init = 'normal'  # torchvision's N(0, 0.01^2).
  config.model.init_std = 0.01  # Std of the (truncated) normal init.
  config.model.width = 1.0  # Channel multiplier.
  config.model.num_classes = config_dict.placeholder(int)  # None: dataset's.
  config.model.conv_impl = 'auto'  # auto, fast, onednn, xla, shifted, im2col.
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.

  config.optim.learning_rate = 0.05
  config.optim.weight_decay = 1e-4
  config.train.aux_loss_weight = 0.3  # Paper, Sec. 5 (with aux_heads=True).
  return config
