r"""LeNet-5 in its classic form (tanh, average pooling), as LeCun et al. 1998;
otherwise the same run as lenet5.py (`diff` the two to see the ablation).

  python launch.py --config=configs/lenet5_classic.py
  python launch.py --config=configs/lenet5_classic.py \
      --config.model.activation=sigmoid   # the saturating variant
"""

from configs import lenet5


def get_config():
  config = lenet5.get_config()
  config.name = 'lenet5_classic'
  config.model.activation = 'tanh'
  config.model.pool = 'avg'
  return config
