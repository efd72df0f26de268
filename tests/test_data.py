"""Data: checksum-verified Fashion-MNIST, preprocessing, determinism."""

import gzip
import hashlib
import os
import pathlib
import shutil

import numpy as np
import pytest

import tensorflow_datasets as tfds

from cnn_lab import data
from cnn_lab.data import debian_fashion_mnist, sources
from cnn_lab.errors import ConfigError


def registered_checksums() -> dict[str, str]:
  """file name -> sha256, as TFDS registers them for fashion_mnist."""
  path = (pathlib.Path(tfds.__file__).parent / 'url_checksums' /
          'fashion_mnist.txt')
  sums = {}
  for line in path.read_text().splitlines():
    url, _, sha, name = line.split('\t')
    sums[name] = sha
  return sums


def test_rebuilt_headers_match_tfds_checksums(tmp_path):
  manual = debian_fashion_mnist.write_manual_dir(tmp_path)
  sums = registered_checksums()
  assert len(sums) == 4
  for name, sha in sums.items():
    rebuilt = (manual / name).read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == sha
    # The body is Debian's, byte for byte, and still decompresses.
    debian = (debian_fashion_mnist.DEBIAN_DIR / name).read_bytes()
    assert rebuilt.endswith(debian[10:])
    assert gzip.decompress(rebuilt) == gzip.decompress(debian)


def test_tfds_rejects_a_file_whose_checksum_does_not_match(tmp_path):
  debian = tmp_path / 'debian'
  debian.mkdir()
  for f in debian_fashion_mnist.DEBIAN_DIR.glob('*.gz'):
    (debian / f.name).write_bytes(f.read_bytes())
  labels = debian / 't10k-labels-idx1-ubyte.gz'
  corrupted = bytearray(labels.read_bytes())
  corrupted[-20] ^= 0xFF
  labels.write_bytes(bytes(corrupted))
  with pytest.raises(Exception, match='(?i)checksum'):
    sources.prepare_fashion_mnist(tmp_path / 'tfds', debian_dir=debian)
  assert not (tmp_path / 'tfds' / 'fashion_mnist' / '3.0.1'
              / 'dataset_info.json').exists()


@pytest.fixture(scope='module')
def fashion():
  return sources.load_tfds('fashion_mnist')


def test_fashion_mnist_splits(fashion):
  train, test, num_classes = fashion
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  assert train.images.dtype == np.uint8 and num_classes == 10
  for split in (train, test):
    assert set(np.unique(split.labels)) == set(range(10))
  # Fashion-MNIST is balanced: 6000 and 1000 examples of each class.
  assert np.all(np.bincount(train.labels) == 6000)
  assert np.all(np.bincount(test.labels) == 1000)


def test_unknown_dataset_is_a_config_error():
  with pytest.raises(ConfigError, match="data.dataset='no_such_set'"):
    sources.load_tfds('no_such_set')


def test_unprepared_dataset_offline_fails_with_instructions(tmp_path,
                                                            monkeypatch):
  monkeypatch.setattr(sources, '_can_reach', lambda url, timeout=3.0: False)
  with pytest.raises(ConfigError, match='tfds build mnist'):
    sources.load_tfds('mnist', tmp_path)


def synthetic(**kw):
  args = dict(dataset='synthetic', image_size=8, synthetic_shape=(8, 8, 3),
              synthetic_train=40, synthetic_test=10) | kw
  return data.make_datasets(**args)


def test_shuffle_is_a_permutation_per_epoch_and_deterministic_per_seed():
  ds = synthetic()
  per_epoch = ds.train.steps_per_epoch(8)  # 5 batches of 8 cover all 40.
  # Identify examples by their pixels (unique with overwhelming odds).
  def keys(seed, start):
    return [b['image'][i].tobytes() for s in range(start, start + per_epoch)
            for b in [ds.train.train_batch(s, 8, seed)]
            for i in range(8)]
  epoch0 = keys(0, 0)
  assert len(set(epoch0)) == 40
  assert keys(0, 0) == epoch0
  assert keys(1, 0) != epoch0
  assert set(keys(0, per_epoch)) == set(epoch0)  # Next epoch, same examples.
  assert keys(0, per_epoch) != epoch0  # ... in another order.


def test_augmentation_deterministic_per_seed():
  ds = synthetic(random_crop=True, crop_padding=2, random_flip=True)
  a = ds.train.train_batch(3, 8, seed=0)['image']
  b = ds.train.train_batch(3, 8, seed=0)['image']
  c = ds.train.train_batch(3, 8, seed=1)['image']
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_augment_crop_and_flip_by_hand():
  images = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
  flipped = data.augment(images, np.random.default_rng(0), random_crop=False,
                         crop_padding=0, random_flip=True)
  for img, out in zip(images, flipped):
    assert (np.array_equal(out, img) or np.array_equal(out, img[:, ::-1]))
  cropped = data.augment(images, np.random.default_rng(0), random_crop=True,
                         crop_padding=1, random_flip=False)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for pad, out in zip(padded, cropped):
    # Each crop is one of the 9 windows of the padded image.
    assert any(np.array_equal(out, pad[y:y + 4, x:x + 4])
               for y in range(3) for x in range(3))


def test_fit_to_size():
  img = np.full((1, 28, 28, 1), 200, np.uint8)
  padded = data.fit_to_size(img, 32, 'auto')
  assert padded.shape == (1, 32, 32, 1)
  assert padded[0, :2].max() == 0 and padded[0, 2:30, 2:30].min() == 200
  resized = data.fit_to_size(img, 64, 'auto')
  assert resized.shape == (1, 64, 64, 1)
  assert np.all(resized == 200)  # Bilinear resize keeps a constant image.
  ramp = np.tile(np.linspace(0, 1, 4, dtype=np.float32), (1, 4, 1))[..., None]
  np.testing.assert_allclose(data.fit_to_size(ramp, 2, 'resize')[0, 0, :, 0],
                             [1 / 6, 5 / 6], rtol=1e-5)


def test_normalisation_and_eval_mask():
  ds = synthetic()
  batch = next(ds.train.train_batches(40, seed=0))
  flat = batch['image'].reshape(-1, 3)
  # Statistics come from the training split, so they normalise it exactly.
  np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(flat.std(0), 1, atol=1e-3)
  batches = list(ds.test.eval_batches(4))
  assert [b['mask'].sum() for b in batches] == [4, 4, 2]
  assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)


def test_prefetch_passes_items_and_errors():
  assert list(data.prefetch(iter(range(5)), 2, lambda v: v * 2)) == [
      0, 2, 4, 6, 8]

  def broken():
    yield 1
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    list(data.prefetch(broken()))


def test_arrays_kept_from_tfds_are_tfds_own_until_its_files_change(
    tmp_path, monkeypatch):
  # A copy of the prepared dataset (same files, sizes and times).
  shutil.copytree(sources.default_data_dir() / 'fashion_mnist',
                  tmp_path / 'fashion_mnist')
  version_dir = next((tmp_path / 'fashion_mnist').iterdir())
  shutil.rmtree(version_dir / sources.ARRAY_CACHE, ignore_errors=True)
  through_tfds = []
  prepared_builder = sources._prepared_builder
  monkeypatch.setattr(sources, '_prepared_builder', lambda *args: (
      through_tfds.append(args) or prepared_builder(*args)))

  first = sources.load_tfds('fashion_mnist', tmp_path)
  assert len(through_tfds) == 1
  assert (version_dir / sources.ARRAY_CACHE / 'manifest.json').is_file()
  second = sources.load_tfds('fashion_mnist', tmp_path)
  assert len(through_tfds) == 1  # From the kept arrays.
  assert first[2] == second[2] == 10
  for a, b in zip(first[:2], second[:2]):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.images.dtype == np.uint8 and b.labels.dtype == np.int32

  # TFDS's files changed (prepared again): through TFDS, and kept anew.
  record = next(version_dir.glob('*train.tfrecord*'))
  os.utime(record, ns=(record.stat().st_atime_ns,
                       record.stat().st_mtime_ns + 10**9))
  third = sources.load_tfds('fashion_mnist', tmp_path)
  assert len(through_tfds) == 2
  np.testing.assert_array_equal(third[0].images, first[0].images)
  sources.load_tfds('fashion_mnist', tmp_path)
  assert len(through_tfds) == 2

  # Another tensorflow-datasets: through TFDS.
  real_version = sources.importlib.metadata.version
  monkeypatch.setattr(sources.importlib.metadata, 'version',
                      lambda package: '0.0.1' if package == (
                          'tensorflow-datasets') else real_version(package))
  sources.load_tfds('fashion_mnist', tmp_path)
  assert len(through_tfds) == 3


def test_a_failed_write_of_the_arrays_leaves_nothing_behind(tmp_path,
                                                         monkeypatch):
  version_dir = tmp_path / 'fashion_mnist' / '3.0.1'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{}')
  split = sources.Split(np.zeros((2, 4, 4, 1), np.uint8),
                        np.zeros(2, np.int32))
  calls = []

  def disk_full(path, array):
    calls.append(path)
    if len(calls) == 3:
      raise OSError(28, 'No space left on device')
    with open(path, 'wb') as f:
      np.lib.format.write_array(f, array)

  monkeypatch.setattr(sources.np, 'save', disk_full)
  sources.write_array_cache(version_dir, split, split, 10)  # No error.
  assert len(calls) == 3
  assert sorted(p.name for p in version_dir.iterdir()) == [
      'dataset_info.json']
  assert sources.read_array_cache('fashion_mnist', tmp_path) is None
  monkeypatch.undo()
  sources.write_array_cache(version_dir, split, split, 10)
  kept = sources.read_array_cache('fashion_mnist', tmp_path)
  assert kept is not None and kept[2] == 10
  np.testing.assert_array_equal(kept[0].images, split.images)
