"""Datasets for cnn_lab: `make_datasets(**config.data)`.

Real data comes through tensorflow-datasets (`fashion_mnist` offline from
Debian's package; any other TFDS image-classification dataset where it is
prepared or can be downloaded); `synthetic` is for tests and benchmarks.
"""

import dataclasses

import numpy as np

from cnn_lab.data import sources
from cnn_lab.data.pipeline import Pipeline, fit_to_size, augment, prefetch
from cnn_lab.errors import ConfigError, check_choice, check_positive

__all__ = ['Datasets', 'make_datasets', 'Pipeline', 'fit_to_size', 'augment',
           'prefetch']

RESIZE_MODES = ('auto', 'pad', 'resize')


@dataclasses.dataclass
class Datasets:
  train: Pipeline
  test: Pipeline
  num_classes: int
  image_shape: tuple[int, int, int]  # Model input (H, W, C).
  name: str


def make_datasets(*, dataset: str, image_size: int, data_dir=None,
                  resize: str = 'auto', normalize: bool = True,
                  random_crop: bool = False, crop_padding: int = 4,
                  random_flip: bool = False,
                  synthetic_shape=(32, 32, 3), synthetic_classes: int = 10,
                  synthetic_train: int = 512, synthetic_test: int = 256,
                  ) -> Datasets:
  """Loads `dataset` and wraps its splits in training/eval pipelines."""
  check_positive('data.image_size', image_size, integer=True)
  check_choice('data.resize', resize, RESIZE_MODES)
  if not isinstance(crop_padding, int) or crop_padding < 0:
    raise ConfigError(f'data.crop_padding={crop_padding!r} is not allowed; '
                      'it must be an integer >= 0')
  if dataset == 'synthetic':
    shape = tuple(synthetic_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
      raise ConfigError(f'data.synthetic_shape={synthetic_shape!r} is not '
                        'allowed; it must be three positive integers H, W, C')
    check_positive('data.synthetic_classes', synthetic_classes, integer=True)
    check_positive('data.synthetic_train', synthetic_train, integer=True)
    check_positive('data.synthetic_test', synthetic_test, integer=True)
    train, test, num_classes = sources.make_synthetic(
        shape, synthetic_classes, synthetic_train, synthetic_test)
  else:
    if not isinstance(dataset, str) or not dataset:
      raise ConfigError(f'data.dataset={dataset!r} is not allowed; give a '
                        'TFDS dataset name or \'synthetic\'')
    train, test, num_classes = sources.load_tfds(dataset, data_dir)

  if normalize:
    # Per-channel statistics of (up to) the first 10k training images.
    pixels = train.images[:10000].reshape(-1, train.images.shape[-1]) / 255.0
    mean, std = pixels.mean(0), pixels.std(0) + 1e-6
  else:
    mean, std = np.zeros(train.images.shape[-1]), np.ones(
        train.images.shape[-1])
  common = dict(image_size=image_size, resize=resize, mean=mean, std=std)
  aug = dict(random_crop=random_crop, crop_padding=crop_padding,
             random_flip=random_flip)
  return Datasets(
      train=Pipeline(train, **common, **aug),
      test=Pipeline(test, **common),
      num_classes=num_classes,
      image_shape=(image_size, image_size, train.images.shape[-1]),
      name=dataset)
