"""Batches: fit to the model's input size, normalise, augment, prefetch.

The order of training examples is a pure function of (seed, epoch) and each
batch's augmentation a pure function of (seed, step), so batch `s` can be
rebuilt from nothing but the seed and `s`: runs are deterministic, and a
resumed run sees exactly the batches an uninterrupted one would.
"""

import queue
import threading
from typing import Iterator

import numpy as np

from cnn_lab.data.sources import Split


def fit_to_size(images: np.ndarray, size: int, mode: str) -> np.ndarray:
  """Pads (centred, with zeros) or bilinearly resizes uint8/float NHWC images.

  `mode`: 'pad', 'resize', or 'auto' (pad when the image is at most 8 pixels
  smaller than `size`, as for 28x28 -> 32x32; resize otherwise).
  """
  h, w = images.shape[1:3]
  if (h, w) == (size, size):
    return images
  if mode == 'auto':
    mode = 'pad' if 0 < size - h <= 8 and 0 < size - w <= 8 else 'resize'
  if mode == 'pad':
    if h > size or w > size:
      raise ValueError(f'cannot pad {h}x{w} images down to {size}x{size}')
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top),
                           (left, size - w - left), (0, 0)))
  ry, rx = _linear_weights(h, size), _linear_weights(w, size)
  out = np.einsum('yh,nhwc,xw->nyxc', ry, images.astype(np.float32), rx,
                  optimize=True)
  return out if images.dtype != np.uint8 else np.clip(
      np.rint(out), 0, 255).astype(np.uint8)


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of bilinear (half-pixel centre) sampling weights."""
  centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  centres = np.clip(centres, 0, n_in - 1)
  lo = np.floor(centres).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = centres - lo
  weights = np.zeros((n_out, n_in), np.float32)
  weights[np.arange(n_out), lo] += 1 - frac
  weights[np.arange(n_out), hi] += frac
  return weights


def augment(images: np.ndarray, rng: np.random.Generator, *,
            random_crop: bool, crop_padding: int, random_flip: bool
            ) -> np.ndarray:
  """Random crop after zero padding, and random horizontal flip (NHWC)."""
  n, h, w, _ = images.shape
  if random_crop and crop_padding > 0:
    p = crop_padding
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy = rng.integers(0, 2 * p + 1, size=n)
    dx = rng.integers(0, 2 * p + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None]  # (n, w)
    images = padded[np.arange(n)[:, None, None], rows[:, :, None],
                    cols[:, None, :]]
  if random_flip:
    flip = rng.random(n) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return images


class Pipeline:
  """Turns one split into model-ready batches of {'image', 'label'}."""

  def __init__(self, split: Split, *, image_size: int, resize: str,
               mean: np.ndarray, std: np.ndarray, random_crop: bool = False,
               crop_padding: int = 4, random_flip: bool = False):
    # Padding is cheap on uint8 and done once; resizing is done per batch
    # (a resized 224x224 copy of a whole split would not fit in memory).
    h = split.images.shape[1]
    self._resize_per_batch = False
    images = split.images
    if h != image_size:
      if resize == 'pad' or (resize == 'auto' and 0 < image_size - h <= 8):
        images = fit_to_size(images, image_size, 'pad')
      else:
        self._resize_per_batch = True
    self.images, self.labels = images, split.labels
    self.image_size = image_size
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.aug = dict(random_crop=random_crop, crop_padding=crop_padding,
                    random_flip=random_flip)

  def __len__(self):
    return len(self.labels)

  def _prepare(self, idx: np.ndarray, rng: np.random.Generator | None):
    images = self.images[idx]
    if self._resize_per_batch:
      images = fit_to_size(images, self.image_size, 'resize')
    if rng is not None:
      images = augment(images, rng, **self.aug)
    images = (images.astype(np.float32) / 255.0 - self.mean) / self.std
    return {'image': images, 'label': self.labels[idx]}

  def steps_per_epoch(self, batch_size: int) -> int:
    return len(self) // batch_size

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict:
    """Batch number `step` (0-based) of the endless shuffled stream."""
    per_epoch = self.steps_per_epoch(batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = self._permutation(seed, epoch)
    idx = np.sort(order[pos * batch_size:(pos + 1) * batch_size])
    return self._prepare(idx, np.random.default_rng([seed, 1, step]))

  _perm_cache: tuple = (None, None)

  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    key, perm = self._perm_cache
    if key != (seed, epoch):
      perm = np.random.default_rng([seed, 0, epoch]).permutation(len(self))
      self._perm_cache = ((seed, epoch), perm)
    return perm

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0
                    ) -> Iterator[dict]:
    step = start_step
    while True:
      yield self.train_batch(step, batch_size, seed)
      step += 1

  def fixed_batch(self, size: int) -> dict:
    """The first `size` examples (fewer if the split is smaller), without
    augmentation: the same batch on every call, e.g. a probe batch."""
    return self._prepare(np.arange(min(size, len(self))), None)

  def eval_batches(self, batch_size: int, num_examples: int | None = None
                   ) -> Iterator[dict]:
    """Fixed-size batches over the first `num_examples` examples, in order.

    The last batch is padded by repeating examples and carries a 0/1 `mask`,
    so every batch has one shape and the eval step compiles once.
    """
    n = len(self) if num_examples is None else min(num_examples, len(self))
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      mask = (idx < n).astype(np.float32)
      batch = self._prepare(np.minimum(idx, n - 1), None)
      batch['mask'] = mask
      yield batch


def prefetch(iterator: Iterator, size: int = 2, transform=None) -> Iterator:
  """Runs `iterator` (and `transform`, e.g. a device put) on a thread.

  Keeps up to `size` items ready, so the host builds the next batches while
  the accelerator runs the current step. Exceptions reach the consumer.
  """
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        if stop.is_set():
          return
        q.put(transform(item) if transform else item)
    except BaseException as e:  # Handed to the consumer, re-raised there.
      q.put(e)
    q.put(done)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
