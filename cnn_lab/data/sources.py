"""Where the images come from: TFDS (real data) or a synthetic generator.

Every split is loaded whole into host memory as uint8 NHWC plus int32 labels:
the datasets this project trains on (MNIST-like, CIFAR) are at most a few
hundred MB, and in-memory arrays make the shuffle order a pure function of
(seed, epoch), which is what an exact resume needs.

The arrays TFDS returns are kept next to its own files, in
`<data_dir>/<name>/<version>/cnn_lab-arrays/` (`.npy` files and a
manifest): decoding Fashion-MNIST's 70,000 PNGs through TFDS took
5.9-6.7 s of every run's start, reading the arrays back 0.14 s. The
manifest records the installed tensorflow-datasets version and the name,
size and modification time of every file TFDS prepared; when any of them differs
(the dataset was prepared again, TFDS was upgraded), TFDS loads the
dataset and the arrays are written anew. Where the folder cannot be
written, every run loads through TFDS.
"""

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.parse

import numpy as np

from cnn_lab.data import debian_fashion_mnist
from cnn_lab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, (N, H, W, C)
  labels: np.ndarray  # int32, (N,)

  def __len__(self):
    return len(self.labels)


def default_data_dir() -> pathlib.Path:
  return pathlib.Path(
      os.environ.get('TFDS_DATA_DIR',
                     pathlib.Path.home() / 'tensorflow_datasets'))


def _can_reach(url: str, timeout: float = 3.0) -> bool:
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  try:
    with socket.create_connection((parts.hostname, port), timeout=timeout):
      return True
  except OSError:
    return False


def _builder(name: str, data_dir: pathlib.Path):
  import tensorflow_datasets as tfds  # Heavy; only where real data is used.
  try:
    return tfds.builder(name, data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(
        f'data.dataset={name!r} is not a TFDS dataset; use a name from '
        'https://www.tensorflow.org/datasets/catalog or \'synthetic\'') from None


def prepare_fashion_mnist(data_dir: pathlib.Path | None = None,
                          debian_dir: pathlib.Path | None = None):
  """Prepares TFDS `fashion_mnist` offline from Debian's files; idempotent."""
  import tensorflow_datasets as tfds
  data_dir = pathlib.Path(data_dir or default_data_dir())
  builder = _builder('fashion_mnist', data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = debian_fashion_mnist.write_manual_dir(
      data_dir / 'downloads' / 'manual' / 'fashion_mnist',
      debian_dir or debian_fashion_mnist.DEBIAN_DIR)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual_dir),
          # Refuse any file whose checksum TFDS has not registered or
          # that does not match the registered one.
          force_checksums_validation=True,
      ))
  return builder


def _prepared_builder(name: str, data_dir: pathlib.Path):
  """Returns a prepared builder, preparing it if that can work here."""
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if name == 'fashion_mnist' and debian_fashion_mnist.DEBIAN_DIR.exists():
    return prepare_fashion_mnist(data_dir)
  urls = list(getattr(builder, 'url_infos', None) or {})
  if urls and not _can_reach(urls[0]):
    raise ConfigError(
        f'data.dataset={name!r} is not prepared in {data_dir} and its source '
        f'({urllib.parse.urlsplit(urls[0]).hostname}) cannot be reached from '
        f'here; prepare it where it can (`tfds build {name} '
        f'--data_dir=DIR`) and copy DIR/{name} into {data_dir}')
  if not urls and name == 'fashion_mnist':
    raise ConfigError(
        'data.dataset=\'fashion_mnist\' is not prepared and Debian\'s files '
        'are missing; run `apt-get install dataset-fashion-mnist`')
  builder.download_and_prepare()
  return builder


def _classification_features(name: str, builder):
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ConfigError(
        f'data.dataset={name!r} has no image/label features; cnn_lab trains '
        'image classifiers')
  return features


def describe_tfds(name: str, data_dir: pathlib.Path | None = None
                  ) -> tuple[int, int]:
  """(number of classes, image channels) of TFDS dataset `name`, from its
  static metadata: nothing is downloaded or loaded."""
  builder = _builder(name, pathlib.Path(data_dir or default_data_dir()))
  features = _classification_features(name, builder)
  shape = features['image'].shape
  return int(features['label'].num_classes), int(shape[-1]) if len(
      shape) == 3 else 1


def load_tfds(name: str, data_dir: pathlib.Path | None = None
              ) -> tuple[Split, Split, int]:
  """Loads the train and test splits of TFDS dataset `name` into memory:
  from the arrays kept by an earlier load where they are still TFDS's
  (module docstring), else through TFDS, keeping its arrays."""
  data_dir = pathlib.Path(data_dir or default_data_dir())
  cached = read_array_cache(name, data_dir)
  if cached is not None:
    return cached
  import tensorflow_datasets as tfds
  builder = _prepared_builder(name, data_dir)
  features = _classification_features(name, builder)
  splits = []
  for split in ('train', 'test'):
    if split not in builder.info.splits:
      raise ConfigError(f'data.dataset={name!r} has no {split!r} split')
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = np.asarray(arrays['image'], np.uint8)
    if images.ndim == 3:
      images = images[..., None]
    splits.append(Split(images, np.asarray(arrays['label'], np.int32)))
  loaded = splits[0], splits[1], int(features['label'].num_classes)
  if ':' not in name:  # As read_array_cache: TFDS resolves pinned versions.
    write_array_cache(pathlib.Path(builder.data_dir), *loaded)
  return loaded


ARRAY_CACHE = 'cnn_lab-arrays'


def _tfds_files(version_dir: pathlib.Path) -> dict[str, list[int]]:
  """[size, mtime in ns] of every file TFDS keeps in `version_dir`."""
  return {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
          for p in sorted(version_dir.iterdir()) if p.is_file()}


def _manifest(version_dir: pathlib.Path, num_classes: int) -> dict:
  return {'tensorflow_datasets': importlib.metadata.version(
              'tensorflow-datasets'),
          'num_classes': num_classes, 'files': _tfds_files(version_dir)}


def read_array_cache(name: str, data_dir: pathlib.Path
                     ) -> tuple[Split, Split, int] | None:
  """The splits kept by `write_array_cache` for `name` under `data_dir`,
  or None unless exactly one prepared version holds arrays whose manifest
  matches TFDS's files and version as they are now."""
  if ':' in name or not (data_dir / name).is_dir():
    return None  # A pinned version ('mnist:3.0.1'): TFDS resolves it.
  valid = []
  for manifest_path in (data_dir / name).glob(f'*/{ARRAY_CACHE}/manifest.json'):
    version_dir = manifest_path.parent.parent
    try:
      manifest = json.loads(manifest_path.read_text())
      if (isinstance(manifest, dict) and manifest == _manifest(
          version_dir, manifest.get('num_classes'))):
        valid.append((manifest_path.parent, manifest['num_classes']))
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
      continue
  if len(valid) != 1:
    return None
  folder, num_classes = valid[0]
  try:
    train, test = (Split(np.load(folder / f'{split}_images.npy'),
                         np.load(folder / f'{split}_labels.npy'))
                   for split in ('train', 'test'))
  except (OSError, ValueError):
    return None
  return train, test, int(num_classes)


def write_array_cache(version_dir: pathlib.Path, train: Split, test: Split,
                      num_classes: int) -> None:
  """Keeps the splits TFDS returned in `version_dir/cnn_lab-arrays`, written
  into a temporary folder and renamed, so that a reader never sees a part
  of them; quietly skipped where `version_dir` cannot be written."""
  target = version_dir / ARRAY_CACHE
  try:
    manifest = _manifest(version_dir, num_classes)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{ARRAY_CACHE}-',
                                        dir=version_dir))
  except (OSError, importlib.metadata.PackageNotFoundError):
    return
  try:
    for split_name, split in (('train', train), ('test', test)):
      np.save(tmp / f'{split_name}_images.npy', split.images)
      np.save(tmp / f'{split_name}_labels.npy', split.labels)
    (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=1))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from other users.
    shutil.rmtree(target, ignore_errors=True)  # Stale arrays, if any.
    os.rename(tmp, target)
  except OSError:
    pass  # Another process won the race, or the disk is full.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def make_synthetic(shape: tuple[int, int, int], num_classes: int,
                   num_train: int, num_test: int, seed: int = 0
                   ) -> tuple[Split, Split, int]:
  """A learnable synthetic task: one fixed random template per class + noise.

  For tests and benchmarks only; it is never used in place of a real dataset.
  """
  rng = np.random.default_rng(seed)
  templates = rng.uniform(0, 255, size=(num_classes, *shape))

  def split(n, rng):
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    noise = rng.normal(0, 40, size=(n, *shape))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return Split(images, labels)

  return (split(num_train, np.random.default_rng([seed, 1])),
          split(num_test, np.random.default_rng([seed, 2])), num_classes)
