"""Data sets read while they are used (ImageNet): each split is a list of indices into a
random-access source, and a batch reads, decodes, crops and normalises its images in a
thread pool, each thread writing its rows of the batch (decoding, resampling and numpy
release the GIL, so the threads use every core)."""

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np

from pgnas_jax.data import checks, crops, pixels, shards


class Records:
  """A split: example ``i`` is record ``index[i]`` of ``source`` (read on access);
  ``origin`` names it in messages about its values."""

  def __init__(self, source, index: np.ndarray, origin: checks.Origin | None = None):
    self.source, self.index, self.origin = source, index, origin

  def __len__(self) -> int:
    return len(self.index)

  @property
  def num_examples(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> tuple:
    """(image uint8 [h, w, c], label)."""
    record = self.source[int(self.index[i])]
    return record['image'], int(record['label'])


@dataclasses.dataclass(frozen=True)
class Streamed:
  """A data set read while it is used; ``data.Dataset`` answers the same interface."""

  train: Records
  validation: Records
  test: Records
  num_classes: int
  mean: np.ndarray  # per channel, in [0, 1] units
  std: np.ndarray
  image_size: int  # side of the square network input
  pool: ThreadPoolExecutor
  # the evaluation splits are read again on every pass, not placed on the devices once
  in_memory = False

  @property
  def image_shape(self) -> tuple:
    """(height, width, channels) of the network input."""
    return (self.image_size, self.image_size, 3)

  def train_batch(
    self,
    data: ml_collections.ConfigDict,
    seed: int,
    step: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict:
    """This process's rows of training step ``step``'s global batch: random-resized crop and
    flip. Example ``r`` of the global batch draws its crop and flip from (seed, epoch,
    position, r), so a row is the same whichever process reads it."""
    epoch, position, index = shards.global_batch(seed, step, len(self.train), batch_size)
    rows = shards.local_rows(batch_size, process_index, process_count)
    images, labels = self._empty_batch(rows)

    def example(r):
      rng = np.random.default_rng([seed, epoch, position, r])
      image, label = self.train[index[r]]
      image = crops.random_resized_crop(image, self.image_size, rng)
      if data.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
      images[r - rows.start] = pixels.normalise(image, self.mean, self.std)
      labels[r - rows.start] = label

    list(self.pool.map(example, range(rows.start, rows.stop)))  # list: raises their errors
    self._check_labels(labels, self.train)
    return {'images': images, 'labels': labels}

  def _check_labels(self, labels: np.ndarray, split: Records) -> None:
    """Labels are checked as they are read: too many records to read them all at start."""
    if split.origin is not None:
      checks.check_labels(labels, self.num_classes, split.origin)

  def _empty_batch(self, rows: slice) -> tuple:
    size = self.image_size
    return (
      np.zeros((rows.stop - rows.start, size, size, 3), np.float32),
      np.zeros(rows.stop - rows.start, np.int32),
    )

  def eval_batches(
    self, split: Records, batch_size: int, process_index: int = 0, process_count: int = 1
  ) -> Iterator[dict]:
    """This process's rows of each fixed-size global batch over the split, centre-cropped;
    rows past the end are zero images with label 0 and ``weights`` 0, so every batch has one
    shape."""
    rows = shards.local_rows(batch_size, process_index, process_count)
    for start in range(0, len(split), batch_size):
      first = start + rows.start
      real = range(first, min(start + rows.stop, len(split)))
      images, labels = self._empty_batch(rows)

      def example(i):
        image, label = split[i]
        images[i - first] = pixels.normalise(
          crops.centre_crop(image, self.image_size), self.mean, self.std
        )
        labels[i - first] = label

      list(self.pool.map(example, real))  # list: raises their errors
      self._check_labels(labels, split)
      weights = (np.arange(rows.stop - rows.start) < len(real)).astype(np.float32)
      yield {'images': images, 'labels': labels, 'weights': weights}
