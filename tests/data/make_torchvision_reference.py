r"""Writes torchvision_reference.json: what the model-zoo tests compare with.

Not run by the tests (they only read the JSON); run it by hand where
torch 2.13.0 and torchvision 0.28.0 are installed:

  python tests/data/make_torchvision_reference.py > tests/data/torchvision_reference.json

For each model: the trainable parameter count at 1000 classes and, for a
1x3x224x224 input, the output shape (as H, W, C) of every Conv2d, Linear and
BatchNorm2d in call order, and the multiply-accumulates of the Conv2d and
Linear layers. Only the pure-Python model definitions are used; where
torchvision's compiled ops cannot load (a CUDA-only wheel next to a CPU
torch), the two op schemas its import registers are defined first.
"""

import json
import sys

import torch

try:
  import torchvision  # noqa: F401
except (RuntimeError, OSError, ImportError):
  lib = torch.library.Library('torchvision', 'DEF')
  lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
import torchvision  # noqa: E402
from torchvision import models  # noqa: E402

COUNT_ONLY = ['vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg19',
              'vgg19_bn', 'resnet34', 'resnet101', 'resnet152']
TRACED = ['alexnet', 'vgg16_bn', 'googlenet', 'resnet18', 'resnet50']


def build(name):
  kwargs = {'weights': None, 'num_classes': 1000}
  if name == 'googlenet':
    kwargs.update(aux_logits=False, init_weights=False)
  return getattr(models, name)(**kwargs).eval()


def trace(model):
  layers, macs = [], 0

  def hook(module, inputs, out):
    nonlocal macs
    shape = tuple(out.shape[1:])
    if len(shape) == 3:  # C, H, W -> H, W, C
      shape = (shape[1], shape[2], shape[0])
    layers.append(list(shape))
    if isinstance(module, torch.nn.Conv2d):
      kh, kw = module.kernel_size
      macs += (out.shape[2] * out.shape[3] * module.out_channels
               * module.in_channels // module.groups * kh * kw)
    elif isinstance(module, torch.nn.Linear):
      macs += module.in_features * module.out_features

  for m in model.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear,
                      torch.nn.BatchNorm2d)):
      m.register_forward_hook(hook)
  with torch.no_grad():
    model(torch.zeros(1, 3, 224, 224))
  return layers, macs


def main():
  out = {'versions': {'torch': torch.__version__,
                      'torchvision': torchvision.__version__},
         'models': {}}
  for name in COUNT_ONLY + TRACED:
    model = build(name)
    entry = {'params': sum(p.numel() for p in model.parameters())}
    if name in TRACED:
      entry['layer_output_shapes'], entry['macs'] = trace(model)
    out['models'][name] = entry
  aux = models.googlenet(weights=None, num_classes=1000, aux_logits=True,
                         init_weights=False)
  out['models']['googlenet_aux'] = {
      'params': sum(p.numel() for p in aux.parameters())}
  json.dump(out, sys.stdout, indent=1)
  sys.stdout.write('\n')


if __name__ == '__main__':
  main()
