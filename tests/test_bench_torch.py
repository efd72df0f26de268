"""cnn_lab.bench.torch_models against the Flax models of the same configs:
the same parameters layer by layer, and with the Flax weights copied in, the
same logits in evaluation and in training mode (batch statistics)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from cnn_lab import models  # noqa: E402
from cnn_lab.bench import torch_models  # noqa: E402


def flax_model(config_name, num_classes, **knobs):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  return models.create_model(**{**config.model.to_dict(),
                                'num_classes': num_classes, **knobs})


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


EXPECTED_PARAMS = {
    'lenet5': 61_706,
    'resnet20': 269_722,  # The paper's 0.27M (test_models' count).
    'vgg16_bn': 15_253_578,
    'resnet50': 25_557_032,  # torchvision's resnet50 (tests/data).
}


@pytest.mark.parametrize('name', torch_models.NAMES)
def test_same_parameters_as_flax(name):
  model, (c, h, w), num_classes = torch_models.build(name)
  flax = flax_model(name, num_classes)
  x = jax.ShapeDtypeStruct((2, h, w, c), jnp.float32)
  variables = jax.eval_shape(
      lambda x: flax.init(jax.random.key(0), x, train=False), x)
  torch_count = sum(p.numel() for p in model.parameters())
  assert torch_count == count(variables['params']) == EXPECTED_PARAMS[name]
  # Layer by layer: every torch weight and statistic has a Flax variable of
  # the same name and (transposed) shape; load_state_dict is strict.
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), variables)
  torch_models.load_flax_params(model, zeros)
  out = model.eval()(torch.zeros(2, c, h, w))
  assert out.shape == (2, num_classes)


def perturb(variables):
  """Random biases, batch-norm scales, shifts and statistics: initialised to
  0 and 1, a mis-copied one would go unseen."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v if path[-1].key == 'kernel' else
      v + rng.uniform(-0.2, 0.2, v.shape).astype(np.float32), variables)


def assert_close(got, expected):
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize('name,knobs,make_torch,shape', [
    ('lenet5', {}, torch_models.LeNet5, (1, 28, 28)),
    ('resnet20', {}, torch_models.CifarResNet, (3, 32, 32)),
    ('vgg16_bn', {'width': 0.25, 'dropout_rate': 0.0},
     lambda: torch_models.VGG(width=0.25, dropout=0.0), (3, 32, 32)),
    # The ImageNet stem from 64x64 up; the stride on the bottleneck's 1x1.
    ('resnet50', {'width': 0.25},
     lambda: torch_models.ResNet(50, 10, width=0.25), (3, 64, 64)),
])
def test_same_logits_with_flax_weights(name, knobs, make_torch, shape):
  c, h, w = shape
  x = np.random.default_rng(0).standard_normal((4, h, w, c), np.float32)
  flax = flax_model(name, 10, **knobs)
  variables = perturb(flax.init(jax.random.key(0), x, train=False))
  model = torch_models.load_flax_params(make_torch(), variables)
  x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
  model.eval()
  expected = np.asarray(flax.apply(variables, x, train=False))
  with torch.no_grad():
    for layout in (torch.contiguous_format, torch.channels_last):
      model.to(memory_format=layout)
      assert_close(model(x_nchw.contiguous(memory_format=layout)).numpy(),
                   expected)

  if 'batch_stats' not in variables:
    return
  expected, updates = flax.apply(variables, x, train=True,
                                 mutable=['batch_stats'])
  with torch.no_grad():
    got = model.train()(x_nchw.contiguous(memory_format=torch.channels_last))
  assert_close(got.numpy(), np.asarray(expected))
  # Momentum: the same moving averages of the batch means (the variances
  # differ by PyTorch's unbiased estimate; see torch_models).
  state = model.state_dict()
  for path, mean in jax.tree_util.tree_flatten_with_path(
      updates['batch_stats'])[0]:
    if path[-1].key == 'mean':
      key = '.'.join(p.key for p in path[:-1]) + '.running_mean'
      assert_close(state[key].numpy(), np.asarray(mean))
