"""The model zoo: `create_model(name=..., **knobs)` picks a module by name.

The registry is the explicit dict `MODELS` of module classes with some fields
preset. A preset `stages` or `depth` is the model's identity and cannot be
overridden; every other field is a knob whose default reproduces the paper
(each module's docstring says which one and where it departs). Knob values
are checked here, before anything is traced or compiled.
"""

import dataclasses
import functools
import math

import flax.linen as nn

from cnn_lab import kernels, layers
from cnn_lab.errors import ConfigError, check_choice, check_positive
from cnn_lab.models import alexnet, googlenet, lenet, nin, resnet, vgg

P = functools.partial

MODELS = {
    'lenet5': lenet.LeNet5,
    'alexnet': alexnet.AlexNet,
    'nin': nin.NiN,
    'googlenet': googlenet.GoogLeNet,
    'googlenet_no_reduction': P(googlenet.GoogLeNet, reduction=False),
    'googlenet_paper': P(
        googlenet.GoogLeNet, norm='none', branch5='5x5', pool4=3,
        aux_pool='paper', dropout_rate=0.4, lrn=True, aux_heads=True,
        kernel_init='lecun_uniform'),
    # ImageNet ResNets; 'resnet' takes `depth` as a knob.
    'resnet': resnet.ResNet,
    # CIFAR ResNets of depth 6n+2; 'cifar_resnet' takes `depth` as a knob.
    'cifar_resnet': resnet.CifarResNet,
}
for _depth in (11, 13, 16, 19):
  _stages = getattr(vgg, f'VGG{_depth}').keywords['stages']
  MODELS[f'vgg{_depth}'] = P(vgg.VGG, stages=_stages)
  MODELS[f'vgg{_depth}_bn'] = P(vgg.VGG, stages=_stages, norm='batch')
for _depth in resnet.IMAGENET_DEPTHS:
  MODELS[f'resnet{_depth}'] = P(resnet.ResNet, depth=_depth)
for _depth in (18, 34):  # The paper's plain ImageNet networks (Table 2).
  MODELS[f'plain{_depth}'] = P(resnet.ResNet, depth=_depth, residual=False)
for _depth in resnet.CIFAR_DEPTHS:
  MODELS[f'resnet{_depth}'] = P(resnet.CifarResNet, depth=_depth)
  MODELS[f'plain{_depth}'] = P(resnet.CifarResNet, depth=_depth,
                               residual=False)

# Preset fields that name the network itself rather than a knob.
IDENTITY_FIELDS = ('stages', 'depth')


def _module_class(factory):
  return factory.func if isinstance(factory, functools.partial) else factory


def knobs_of(name: str) -> dict:
  """Knob name -> default of model `name`."""
  factory = MODELS[name]
  preset = factory.keywords if isinstance(factory, functools.partial) else {}
  knobs = {}
  for f in dataclasses.fields(_module_class(factory)):
    if f.name in ('parent', 'name') or (f.name in IDENTITY_FIELDS
                                        and f.name in preset):
      continue
    knobs[f.name] = preset.get(f.name, f.default)
  return knobs


def _check_type(field: str, value, annotation) -> None:
  if annotation is bool and not isinstance(value, bool):
    raise ConfigError(f'model.{field}={value!r} is not allowed; it must be '
                      'True or False')
  if annotation is str and not isinstance(value, str):
    raise ConfigError(f'model.{field}={value!r} is not allowed; it must be '
                      'a string')
  if annotation in (int, float) and (
      isinstance(value, bool) or not isinstance(
          value, int if annotation is int else (int, float))):
    raise ConfigError(f'model.{field}={value!r} is not allowed; it must be '
                      f'{"an integer" if annotation is int else "a number"}')


def create_model(*, name: str, **knobs) -> nn.Module:
  """Returns model `name` with its knobs set; raises ConfigError if invalid."""
  check_choice('model.name', name, tuple(MODELS))
  allowed = knobs_of(name)
  unknown = sorted(set(knobs) - set(allowed))
  if unknown:
    raise ConfigError(f'model.{unknown[0]} is not a knob of {name}; its '
                      f'knobs are {", ".join(sorted(allowed))}')
  cls = _module_class(MODELS[name])
  types = {f.name: f.type for f in dataclasses.fields(cls)}
  for field, value in knobs.items():
    if value is not None or allowed[field] is not None:
      _check_type(field, value, types[field])
  values = {**allowed, **knobs}
  check_choice('model.norm', values['norm'], layers.NORMS)
  check_choice('model.activation', values['activation'],
               tuple(layers.ACTIVATIONS))
  layers.get_kernel_init(values['kernel_init'], values['init_std'])
  check_choice('model.conv_impl', values['conv_impl'], kernels.CONV_IMPLS)
  layers.get_dtype(values['dtype'])
  check_positive('model.num_classes', values['num_classes'], integer=True)
  check_positive('model.width', values['width'])
  if 'dropout_rate' in values:
    rate = values['dropout_rate']
    if not math.isfinite(rate) or not 0 <= rate < 1:
      raise ConfigError(f'model.dropout_rate={rate!r} is not allowed; it '
                        'must be in [0, 1)')
  if 'bn_momentum' in values:
    m = values['bn_momentum']
    if not math.isfinite(m) or not 0 <= m < 1:
      raise ConfigError(f'model.bn_momentum={m!r} is not allowed; it must be '
                        'in [0, 1) (the weight of the old value in the '
                        'moving averages; PyTorch momentum=0.1 is 0.9)')
  if 'head_features' in values and not (
      values['head_features'] is None and allowed['head_features'] is None):
    features = values['head_features']
    if not isinstance(features, (tuple, list)) or any(
        isinstance(f, bool) or not isinstance(f, int) or f <= 0
        for f in features):
      raise ConfigError(f'model.head_features={features!r} is not allowed; '
                        'it must be a tuple of positive integers, e.g. '
                        '(4096, 4096)')
  for field, choices in getattr(cls, 'knob_choices', {}).items():
    if field in values:
      check_choice(f'model.{field}', values[field], choices)
  model = MODELS[name](**knobs)
  if hasattr(model, 'check_knobs'):
    model.check_knobs()
  return model
