"""Every config in configs/: it loads, names a model whose knobs it lists in
full (so each knob can be overridden from the command line), and its model
builds at its own input size and dataset, without compiling anything."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from cnn_lab import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'base'))

REQUIRED = ['lenet5', 'lenet5_classic', 'alexnet', 'vgg11_nobn', 'vgg11_bn',
            'vgg13_nobn', 'vgg13_bn', 'vgg16_nobn', 'vgg16_bn', 'vgg19_nobn',
            'vgg19_bn', 'nin', 'googlenet', 'googlenet_no_reduction',
            'resnet20', 'resnet56', 'plain20', 'plain56', 'resnet18',
            'resnet50']


def test_every_family_has_its_configs():
  assert set(REQUIRED) <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_lists_every_knob_and_builds(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.name == name
  model_cfg = config.model.to_dict()
  model_name = model_cfg.pop('name')
  assert set(model_cfg) == set(models.knobs_of(model_name))
  assert config.data.dataset == 'fashion_mnist'
  model = models.create_model(
      name=model_name, **{k: v if v is not None else 10
                          for k, v in model_cfg.items()
                          if v is not None or k == 'num_classes'})
  size = config.data.image_size
  out = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
      jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32))
  assert out.shape == (2, 10)


@pytest.mark.parametrize('variant,base,field,value', [
    ('lenet5_classic', 'lenet5', 'activation', 'tanh'),
    ('vgg16_bn', 'vgg16_nobn', 'norm', 'batch'),
    ('googlenet_no_reduction', 'googlenet', 'reduction', False),
    ('plain20', 'resnet20', 'residual', False),
    ('plain56', 'resnet56', 'residual', False),
])
def test_ablation_configs_differ_in_the_named_field(variant, base, field,
                                                    value):
  a = importlib.import_module(f'configs.{variant}').get_config().to_dict()
  b = importlib.import_module(f'configs.{base}').get_config().to_dict()
  assert a['model'][field] == value != b['model'][field]
  a['model'].pop(field), b['model'].pop(field)
  if variant == 'lenet5_classic':  # Classic: also average pooling.
    assert a['model'].pop('pool') == 'avg' and b['model'].pop('pool') == 'max'
  a.pop('name'), b.pop('name')
  assert a == b
