"""PyTorch twins of cnn_lab's Flax models, for the benchmark: written from
scratch (no torchvision), with the same layers, shapes, strides, shortcuts
and batch-norm settings as the Flax modules that configs/lenet5.py,
resnet20.py, vgg16_bn.py and resnet50.py build (resnet50 at 224x224x3 and
1000 classes, as in He et al. 2016, Table 1).

Layers carry the Flax names (torch's `stage2_block1.conv1` is Flax's
`stage2_block1/conv1`), so `load_flax_params` copies a Flax model's variables
in, and then both compute the same function (tests/test_bench_torch.py).
Batch norm as in cnn_lab.layers.make_norm: epsilon 1e-5, and torch's momentum
0.1 is Flax's 0.9 (torch weights the new batch statistics, Flax the old
average). One difference is PyTorch's own: it updates the running variance
with the unbiased batch variance (times m/(m-1), m values per channel), Flax
with the biased one; the batch's normalisation is the same. Weights keep
PyTorch's default initialisation: the benchmark times the networks, it does
not train them. Inputs are NCHW, contiguous or channels_last.
"""

import collections
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # Weight of the new batch: Flax's momentum 0.9.


def batch_norm(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def conv_no_bias(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
  return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2,
                   bias=False)


def relu() -> nn.ReLU:
  return nn.ReLU(inplace=True)


def scale_width(channels: int, width: float) -> int:
  """cnn_lab.layers.scale_width: channels under the width multiplier."""
  return max(1, int(round(channels * width)))


class FlattenHWC(nn.Module):
  """Flattens NCHW maps in (H, W, C) order, as the Flax models flatten their
  NHWC maps, so dense kernels copy over unpermuted (a view on channels_last
  tensors)."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x.permute(0, 2, 3, 1), 1)


class LeNet5(nn.Sequential):
  """Modern LeNet-5 on 28x28x1 (cnn_lab.models.lenet with configs/lenet5.py):
  5x5 convolutions of 6 (padded by 2) and 16 channels, each with ReLU and a
  2x2 max-pool, then dense layers of 120, 84 and `num_classes` units."""

  def __init__(self, num_classes: int = 10):
    super().__init__(collections.OrderedDict([
        ('conv1', nn.Conv2d(1, 6, 5, padding=2)), ('act1', relu()),
        ('pool1', nn.MaxPool2d(2)),
        ('conv2', nn.Conv2d(6, 16, 5)), ('act2', relu()),
        ('pool2', nn.MaxPool2d(2)),
        ('flatten', FlattenHWC()),
        ('fc1', nn.Linear(5 * 5 * 16, 120)), ('fc1_act', relu()),
        ('fc2', nn.Linear(120, 84)), ('fc2_act', relu()),
        ('fc3', nn.Linear(84, num_classes))]))


class VGG(nn.Sequential):
  """VGG with batch norm (cnn_lab.models.vgg with configs/vgg16_bn.py) on
  32x32x3: per stage, 3x3 convolutions with bias, each followed by batch
  norm and ReLU, then a 2x2 max-pool; the features end at 1x1, and the head
  is the small-input one: two dense layers of 512 units with ReLU and
  dropout, then the classifier. `width` scales channels and hidden units."""

  def __init__(self, stages=(2, 2, 3, 3, 3), num_classes: int = 10,
               width: float = 1.0, dropout: float = 0.5, head=(512, 512)):
    layers, c = [], 3
    for s, (num_convs, ch) in enumerate(zip(stages, (64, 128, 256, 512, 512)),
                                        1):
      ch = scale_width(ch, width)
      for i in range(1, num_convs + 1):
        layers += [(f'block{s}_conv{i}', nn.Conv2d(c, ch, 3, padding=1)),
                   (f'block{s}_bn{i}', batch_norm(ch)),
                   (f'block{s}_act{i}', relu())]
        c = ch
      layers.append((f'block{s}_pool', nn.MaxPool2d(2)))
    layers.append(('flatten', FlattenHWC()))
    for i, features in enumerate(head, 1):
      features = scale_width(features, width)
      layers += [(f'fc{i}', nn.Linear(c, features)), (f'fc{i}_act', relu()),
                 (f'fc{i}_dropout', nn.Dropout(dropout))]
      c = features
    layers.append((f'fc{len(head) + 1}', nn.Linear(c, num_classes)))
    super().__init__(collections.OrderedDict(layers))


class Block(nn.Module):
  """Residual block (cnn_lab.models.resnet.Block): two 3x3 convolutions, or
  a bottleneck (1x1 reduce to features/4, 3x3, 1x1 expand) with the stride
  on the first 1x1 ('1x1', the paper) or on the 3x3 ('3x3', torchvision);
  batch norm after each convolution, ReLU after the sum. Where the shape
  changes the shortcut is option 'A' (subsample, zero channels split
  extra//2 before and the rest after) or 'B' (1x1 projection and batch
  norm); elsewhere it is the identity."""

  def __init__(self, c_in: int, features: int, stride: int, bottleneck: bool,
               shortcut: str, bottleneck_stride: str = '1x1'):
    super().__init__()
    if shortcut not in ('A', 'B') or bottleneck_stride not in ('1x1', '3x3'):
      raise ValueError(f'shortcut={shortcut!r}, '
                       f'bottleneck_stride={bottleneck_stride!r}')
    if bottleneck:
      s1, s3 = (stride, 1) if bottleneck_stride == '1x1' else (1, stride)
      specs = [(features // 4, 1, s1), (features // 4, 3, s3),
               (features, 1, 1)]
    else:
      specs = [(features, 3, stride), (features, 3, 1)]
    c = c_in
    for i, (c_out, kernel, s) in enumerate(specs, 1):
      self.add_module(f'conv{i}', conv_no_bias(c, c_out, kernel, s))
      self.add_module(f'bn{i}', batch_norm(c_out))
      c = c_out
    self.num_convs = len(specs)
    self.stride = stride
    self.extra = features - c_in  # Zero channels of option A.
    self.project = shortcut == 'B' and (stride != 1 or c_in != features)
    if self.project:
      self.proj_conv = conv_no_bias(c_in, features, 1, stride)
      self.proj_bn = batch_norm(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = x
    for i in range(1, self.num_convs + 1):
      y = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(y))
      if i < self.num_convs:
        y = torch.relu_(y)
    return torch.relu_(y + self.shortcut(x))

  def shortcut(self, x: torch.Tensor) -> torch.Tensor:
    if self.project:
      return self.proj_bn(self.proj_conv(x))
    if self.stride != 1:
      x = x[:, :, ::self.stride, ::self.stride]
    if self.extra:
      x = nn.functional.pad(
          x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return x


def global_avg_pool():
  return [('avg_pool', nn.AdaptiveAvgPool2d(1)), ('flatten', nn.Flatten())]


class CifarResNet(nn.Sequential):
  """CIFAR ResNet of depth 6n+2 (He et al. 2016, Sec. 4.2;
  cnn_lab.models.resnet.CifarResNet with configs/resnet20.py): a 3x3 stem of
  16 channels, three stages of n basic blocks with 16, 32, 64 channels and
  option A shortcuts, global average pooling, one dense layer."""

  def __init__(self, depth: int = 20, num_classes: int = 10,
               width: float = 1.0):
    w = lambda c: scale_width(c, width)
    layers = [('conv1', conv_no_bias(3, w(16), 3, 1)),
              ('bn1', batch_norm(w(16))), ('act1', relu())]
    c = w(16)
    for s, ch in enumerate((16, 32, 64), 1):
      for b in range(1, (depth - 2) // 6 + 1):
        stride = 2 if (b == 1 and s > 1) else 1
        layers.append((f'stage{s}_block{b}',
                       Block(c, w(ch), stride, False, 'A')))
        c = w(ch)
    layers += global_avg_pool() + [('fc', nn.Linear(c, num_classes))]
    super().__init__(collections.OrderedDict(layers))


IMAGENET_DEPTHS = {  # Depth: (bottleneck blocks, blocks per stage).
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


class ResNet(nn.Sequential):
  """ImageNet ResNet (He et al. 2016, Table 1; cnn_lab.models.resnet.ResNet
  with configs/resnet50.py, for inputs of 64x64 and more): a 7x7/2 stem and
  a 3x3/2 max-pool, four stages of 64, 128, 256, 512 channels (x4 in
  bottleneck blocks) with option B shortcuts, global average pooling, one
  dense layer."""

  def __init__(self, depth: int = 50, num_classes: int = 1000,
               bottleneck_stride: str = '1x1', width: float = 1.0):
    bottleneck, counts = IMAGENET_DEPTHS[depth]
    w = lambda c: scale_width(c, width)
    layers = [('conv1', conv_no_bias(3, w(64), 7, 2)),
              ('bn1', batch_norm(w(64))), ('act1', relu()),
              ('max_pool', nn.MaxPool2d(3, 2, padding=1))]
    c = w(64)
    for s, (num_blocks, ch) in enumerate(zip(counts, (64, 128, 256, 512)), 1):
      features = w(ch) * 4 if bottleneck else w(ch)
      for b in range(1, num_blocks + 1):
        stride = 2 if (b == 1 and s > 1) else 1
        layers.append((f'stage{s}_block{b}',
                       Block(c, features, stride, bottleneck, 'B',
                             bottleneck_stride)))
        c = features
    layers += global_avg_pool() + [('fc', nn.Linear(c, num_classes))]
    super().__init__(collections.OrderedDict(layers))


# Name: (model for a number of classes, input shape (C, H, W), classes).
SPECS = {
    'lenet5': (LeNet5, (1, 28, 28), 10),
    'resnet20': (lambda n: CifarResNet(20, n), (3, 32, 32), 10),
    'vgg16_bn': (lambda n: VGG((2, 2, 3, 3, 3), n), (3, 32, 32), 10),
    'resnet50': (lambda n: ResNet(50, n), (3, 224, 224), 1000),
}
NAMES = tuple(SPECS)


def build(name: str) -> tuple[nn.Module, tuple[int, int, int], int]:
  """(model, input shape of one example in NCHW order without the batch
  dimension, i.e. (C, H, W), number of classes) of benchmark model `name`."""
  if name not in SPECS:
    raise ValueError(f'unknown model {name!r}; one of {", ".join(NAMES)}')
  make, shape, num_classes = SPECS[name]
  return make(num_classes), shape, num_classes


def _flatten(tree: Mapping, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


# Flax variable name -> PyTorch state_dict name.
_TORCH_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                'mean': 'running_mean', 'var': 'running_var'}


def load_flax_params(model: nn.Module, variables: Mapping) -> nn.Module:
  """Copies a Flax model's `params` and `batch_stats` (any arrays) into
  `model`, in place: conv kernels HWIO -> OIHW, dense kernels (in, out) ->
  (out, in). Raises if a torch weight or statistic is left out, or a shape
  differs. Returns `model`."""
  state = {k: v for k, v in model.state_dict().items()
           if k.endswith('num_batches_tracked')}
  for collection in ('params', 'batch_stats'):
    for path, value in _flatten(variables.get(collection, {})):
      tensor = torch.from_numpy(np.array(value, dtype=np.float32))
      if tensor.ndim == 4:
        tensor = tensor.permute(3, 2, 0, 1)
      elif tensor.ndim == 2:
        tensor = tensor.T
      state['.'.join(path[:-1] + (_TORCH_NAMES[path[-1]],))] = tensor
  model.load_state_dict(state)  # Strict: every entry, each of the same shape.
  return model
