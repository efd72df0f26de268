"""The model zoo: `create_model(name=..., **knobs)` picks a module by name.

The registry is the explicit dict `MODELS`; every knob is a dataclass field
of the module, validated here so that a bad value fails before compilation.
"""

import dataclasses
import math

import flax.linen as nn

from cnn_lab import layers
from cnn_lab.errors import ConfigError, check_choice, check_positive
from cnn_lab.models import vgg

MODELS = {
    'vgg11': vgg.VGG11,
    'vgg13': vgg.VGG13,
    'vgg16': vgg.VGG16,
    'vgg19': vgg.VGG19,
}


def create_model(*, name: str, **knobs) -> nn.Module:
  """Returns model `name` with its knobs set; raises ConfigError if invalid."""
  check_choice('model.name', name, tuple(MODELS))
  factory = MODELS[name]
  fields = {f.name for f in dataclasses.fields(factory.func)} - {
      'parent', 'name', 'stages'}
  unknown = sorted(set(knobs) - fields)
  if unknown:
    raise ConfigError(f'model.{unknown[0]} is not a knob of {name}; its '
                      f'knobs are {", ".join(sorted(fields))}')
  if 'norm' in knobs:
    check_choice('model.norm', knobs['norm'], layers.NORMS)
  if 'activation' in knobs:
    check_choice('model.activation', knobs['activation'],
                 tuple(layers.ACTIVATIONS))
  if 'kernel_init' in knobs:
    layers.get_kernel_init(knobs['kernel_init'], knobs.get('init_std', 0.01))
  if 'conv_impl' in knobs:
    check_choice('model.conv_impl', knobs['conv_impl'], layers.CONV_IMPLS)
  if 'num_classes' in knobs:
    check_positive('model.num_classes', knobs['num_classes'], integer=True)
  if 'dropout_rate' in knobs:
    rate = knobs['dropout_rate']
    if (not isinstance(rate, (int, float)) or isinstance(rate, bool)
        or not math.isfinite(rate) or not 0 <= rate < 1):
      raise ConfigError(f'model.dropout_rate={rate!r} is not allowed; it '
                        'must be in [0, 1)')
  if knobs.get('head_features') is not None:
    for f in knobs['head_features']:
      check_positive('model.head_features[]', f, integer=True)
  return factory(**knobs)
