"""Data sets read while they are used (ImageNet): each split is a list of indices into a
random-access source, and a batch reads, decodes and crops its images in a thread pool
(decoding and resampling release the GIL). Batches hold uint8 pixels; the caller normalises.
"""
import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np

from pgnas_jax.data import crops, shards


class Records:
  """A split: example ``i`` is record ``index[i]`` of ``source`` (read on access)."""

  def __init__(self, source, index: np.ndarray):
    self.source, self.index = source, index

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> tuple:
    """(image uint8 [h, w, c], label)."""
    record = self.source[int(self.index[i])]
    return record['image'], int(record['label'])


@dataclasses.dataclass(frozen=True)
class Streamed:
  train: Records
  validation: Records
  test: Records
  num_classes: int
  mean: np.ndarray  # per channel, in [0, 1] units
  std: np.ndarray
  image_size: int  # side of the square network input
  pool: ThreadPoolExecutor


def train_batch(dataset: Streamed, data: ml_collections.ConfigDict, seed: int, step: int,
                batch_size: int, process_index: int, process_count: int) -> dict:
  """This process's rows of training step ``step``'s global batch: random-resized crop and
  flip. Example ``r`` of the global batch draws its crop and flip from (seed, epoch, position,
  r), so a row is the same whichever process reads it."""
  epoch, position, index = shards.global_batch(seed, step, len(dataset.train), batch_size)
  rows = shards.local_rows(batch_size, process_index, process_count)

  def example(r):
    rng = np.random.default_rng([seed, epoch, position, r])
    image, label = dataset.train[index[r]]
    image = crops.random_resized_crop(image, dataset.image_size, rng)
    if data.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return image, label

  images, labels = zip(*dataset.pool.map(example, range(rows.start, rows.stop)))
  return {'images': np.stack(images), 'labels': np.array(labels, np.int32)}


def eval_batches(split: Records, dataset: Streamed, batch_size: int, process_index: int,
                 process_count: int) -> Iterator[dict]:
  """This process's rows of each fixed-size global batch over the split, centre-cropped;
  rows past the end are zero images with ``weights`` 0, so every batch has one shape."""
  rows = shards.local_rows(batch_size, process_index, process_count)
  size = dataset.image_size
  blank = np.zeros((size, size, 3), np.uint8)

  def example(i):
    if i >= len(split):
      return blank, 0, 0.0
    image, label = split[i]
    return crops.centre_crop(image, size), label, 1.0

  for start in range(0, len(split), batch_size):
    images, labels, weights = zip(*dataset.pool.map(
        example, range(start + rows.start, start + rows.stop)))
    yield {'images': np.stack(images), 'labels': np.array(labels, np.int32),
           'weights': np.array(weights, np.float32)}
