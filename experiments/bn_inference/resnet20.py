r"""Batch norm at inference: ResNet-20 trained with three moving-average
momenta (the weight of the old value: 0.9, PyTorch's 0.1; 0.99; 0.999),
then evaluated by `python -m cnn_lab.evaluate` with the moving averages and
in training mode (each test batch's own statistics) at batch sizes down to 1.

Full scale:
  python launch.py --config=experiments/bn_inference/resnet20.py \
      --workdir=runs/experiments/bn_inference/resnet20
"""

from cnn_lab import sweeps
from configs import resnet20


def get_config():
  config = resnet20.get_config()
  config.name = 'bn_inference'
  return config


def get_sweep():
  return sweeps.sweep('model.bn_momentum', [0.9, 0.99, 0.999])
