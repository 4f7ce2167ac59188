"""Input pipeline: train / held-out validation / test splits and deterministic batches.

The validation split is carved from the training split by a fixed permutation (the same for
every seed, so runs with different seeds rank on the same images) and never trained on. The
test split is touched once, for the winner's final report. Training batches depend only on
(seed, step): a run restarted at step s sees the same stream. Each process reads its own
rows of every global batch (``process_index`` of ``process_count``), and the rows of all
processes together are the one-process batch.

Small data sets (Fashion-MNIST, CIFAR, any tfds data set by name, .npz files) are held in
memory as a ``Dataset``; ImageNet is read while it is used, as a ``stream.Streamed``. Both
answer one interface (``Source``), and ``placement`` puts their batches on the devices.
``checks`` checks their values at start.
"""

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import ml_collections
import numpy as np

from pgnas_jax.data import (
  checks,
  cifar,
  fashion_mnist,
  imagenet,
  npz,
  pixels,
  shards,
  stream,
  tfds_images,
  tfds_source,
)
from pgnas_jax.data.checks import check_fits  # noqa: F401  (re-exported)
from pgnas_jax.data.placement import (  # noqa: F401  (re-exported)
  device_batches,
  replicated_batches,
  train_batches,
)
from pgnas_jax.data.prefetch import in_background  # noqa: F401  (re-exported)
from pgnas_jax.errors import ConfigError

SPLIT_SEED = 20200207  # fixes the validation carve-out for every run


class Split(NamedTuple):
  images: np.ndarray  # uint8 [n, h, w, c], or float32 (an .npz of float images)
  labels: np.ndarray  # int32 [n]

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]


class Dataset(NamedTuple):
  """A data set held in memory; ``stream.Streamed`` answers the same interface."""

  train: Split
  validation: Split
  test: Split
  num_classes: int
  mean: np.ndarray  # per channel, of the training split, in [0, 1] units
  std: np.ndarray
  # the evaluation splits are small enough to place on the devices once
  in_memory = True

  @property
  def image_shape(self) -> tuple:
    """(height, width, channels) of the network input."""
    return self.train.images.shape[1:]

  def train_batch(
    self,
    data: ml_collections.ConfigDict,
    seed: int,
    step: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict:
    """This process's rows of the global batch of training step ``step``: epochs are fresh
    permutations from (seed, epoch). Pad-crop and flip act on the raw pixels, cutout after
    normalisation (zero is the mean)."""
    epoch, position, index = shards.global_batch(seed, step, self.train.num_examples, batch_size)
    rows = shards.local_rows(batch_size, process_index, process_count)
    _, h, w, _ = self.train.images.shape
    draws = augmentation_draws(
      np.random.default_rng([seed, epoch, position]), batch_size, h, w, data
    )
    draws = {k: v[rows] for k, v in draws.items()}
    index = index[rows]
    images = normalise(augment(self.train.images[index], draws, data), self)
    if data.cutout > 0:
      images = cutout(images, draws['centre'], data.cutout)
    return {'images': images, 'labels': self.train.labels[index]}

  def eval_batches(
    self, split: Split, batch_size: int, process_index: int = 0, process_count: int = 1
  ) -> Iterator[dict]:
    """This process's rows of fixed-size global batches over a whole split; the last is
    padded and ``weights`` marks real examples, so every batch has one shape (one
    compilation)."""
    rows = shards.local_rows(batch_size, process_index, process_count)
    n = split.num_examples
    for start in range(0, n, batch_size):
      first, last = min(start + rows.start, n), min(start + rows.stop, n)
      pad = rows.stop - rows.start - (last - first)
      images = np.pad(split.images[first:last], ((0, pad), (0, 0), (0, 0), (0, 0)))
      labels = np.pad(split.labels[first:last], (0, pad))
      weights = np.pad(np.ones(last - first, np.float32), (0, pad))
      yield {'images': normalise(images, self), 'labels': labels, 'weights': weights}


class Source(Protocol):
  """What ``load`` returns and the pipeline reads: ``Dataset`` (held in memory) and
  ``stream.Streamed`` (read while used) both answer it, and so may a user's own."""

  train: Any  # each split with ``num_examples``
  validation: Any
  test: Any
  num_classes: int
  mean: np.ndarray  # per channel, in [0, 1] units
  std: np.ndarray
  in_memory: bool  # whether the evaluation splits may be placed on the devices once

  @property
  def image_shape(self) -> tuple: ...

  def train_batch(
    self, data, seed: int, step: int, batch_size: int, process_index: int, process_count: int
  ) -> dict: ...

  def eval_batches(
    self, split, batch_size: int, process_index: int, process_count: int
  ) -> Iterator[dict]: ...


def _fashion_mnist(data: ml_collections.ConfigDict) -> tuple:
  return (
    fashion_mnist.read(data.data_dir, 'train'),
    fashion_mnist.read(data.data_dir, 'test'),
    fashion_mnist.NUM_CLASSES,
    None,
  )


def _cifar(data: ml_collections.ConfigDict) -> tuple:
  return (
    cifar.read(data.name, data.data_dir, 'train'),
    cifar.read(data.name, data.data_dir, 'test'),
    cifar.NUM_CLASSES[data.name],
    None,
  )


def _npz(data: ml_collections.ConfigDict) -> tuple:
  return (*npz.read(data.path, data.num_classes), None)


def _tfds(data: ml_collections.ConfigDict) -> tuple:
  return tfds_images.read(data.name, data.data_dir)


# data.name -> the reader of a data set held in memory: the ``data`` config -> (train
# ``checks.Raw``, test ``checks.Raw``, number of classes, image shape or None) as the
# source holds them; names ending in ':' take any suffix (``tfds:NAME``)
IN_MEMORY = {
  'fashion_mnist': _fashion_mnist,
  'cifar10': _cifar,
  'cifar100': _cifar,
  'npz': _npz,
  tfds_images.PREFIX: _tfds,
}


def _reader(name: str):
  if name in IN_MEMORY and not name.endswith(':'):
    return IN_MEMORY[name]
  prefix = name.split(':', 1)[0] + ':'
  if ':' in name and prefix in IN_MEMORY and len(name) > len(prefix):
    return IN_MEMORY[prefix]
  return None


def _carve(num_examples: int, validation_size: int) -> tuple:
  """(validation indices, training indices) of the training split."""
  if validation_size >= num_examples:
    raise ConfigError(
      f'--config.data.validation_size={validation_size} leaves no '
      f'training images (the training split has {num_examples})'
    )
  order = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
  return order[:validation_size], order[validation_size:]


def _stream(data: ml_collections.ConfigDict) -> stream.Streamed:
  """ImageNet: the official validation set is the test split."""
  train_source = imagenet.open_split(data.data_dir, 'train')
  test_source = imagenet.open_split(data.data_dir, 'validation')
  origins = {split: tfds_source.origin(imagenet.NAME, split) for split in ('train', 'validation')}
  for split, source in (('train', train_source), ('validation', test_source)):
    checks.check_info_classes(source.dataset_info, imagenet.NUM_CLASSES, origins[split])
  val, train = _carve(len(train_source), data.validation_size)
  # sorted: nearby records are read together (the epoch permutations shuffle anyway)
  return stream.Streamed(
    train=stream.Records(train_source, np.sort(train), origins['train']),
    validation=stream.Records(train_source, np.sort(val), origins['train']),
    test=stream.Records(test_source, np.arange(len(test_source)), origins['validation']),
    num_classes=imagenet.NUM_CLASSES,
    mean=np.array(imagenet.MEAN, np.float32),
    std=np.array(imagenet.STD, np.float32),
    image_size=data.image_size,
    pool=ThreadPoolExecutor(os.cpu_count(), thread_name_prefix='pgnas_jax-read'),
  )


# data.name -> the opener of a data set read while it is used: the ``data`` config -> Source
STREAMED = {imagenet.NAME: _stream}


def names() -> tuple:
  """Every value ``data.name`` takes (``tfds:`` followed by a name for ``tfds:NAME``)."""
  return (*IN_MEMORY, *STREAMED)


def known(name) -> bool:
  """Whether ``name`` is a data set ``load`` reads."""
  return isinstance(name, str) and (name in STREAMED or _reader(name) is not None)


def load(data: ml_collections.ConfigDict) -> Source:
  """The data set ``data`` names, its values checked (``checks``): faults raise DataError."""
  if data.name in STREAMED:
    return STREAMED[data.name](data)
  read = _reader(data.name)
  if read is None:
    raise ConfigError(f'unknown data.name {data.name!r}; choose one of {names()}')
  train_raw, test_raw, num_classes, shape = read(data)
  images, labels = checks.checked_split(train_raw, num_classes, shape)
  test = Split(*checks.checked_split(test_raw, num_classes, images.shape[1:]))
  val, train = _carve(images.shape[0], data.validation_size)
  train_split = Split(images[train], labels[train])
  checks.check_spread(train_split.images, train_raw.origin)
  mean, std = pixels.statistics(train_split.images)
  return Dataset(
    train=train_split,
    validation=Split(images[val], labels[val]),
    test=test,
    num_classes=num_classes,
    mean=mean,
    std=std,
  )


def normalise(images: np.ndarray, dataset: Source) -> np.ndarray:
  return pixels.normalise(images, dataset.mean, dataset.std)


def augmentation_draws(
  rng: np.random.Generator, n: int, height: int, width: int, data: ml_collections.ConfigDict
) -> dict:
  """The random choices of a global batch of ``n`` images, one row per image, drawn in a fixed
  order: 'shift' (pad-crop offsets, [n, 2]), 'flip' ([n]), 'centre' (cutout centres, [n, 2]),
  each only where its augmentation is on. A process slices its rows, so an image's draws do
  not depend on how the batch is split over processes."""
  draws = {}
  if data.pad_crop > 0:
    draws['shift'] = rng.integers(0, 2 * data.pad_crop + 1, size=(2, n)).T
  if data.random_flip:
    draws['flip'] = rng.random(n) < 0.5
  if data.cutout > 0:
    draws['centre'] = np.stack([rng.integers(0, height, n), rng.integers(0, width, n)], 1)
  return draws


def augment(images: np.ndarray, draws: dict, data: ml_collections.ConfigDict) -> np.ndarray:
  """Random pad-and-crop and horizontal flip, per image, as ``draws`` say."""
  n, h, w, _ = images.shape
  out = images
  if 'shift' in draws:
    p = data.pad_crop
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx = draws['shift'].T
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if 'flip' in draws:
    out = np.where(draws['flip'][:, None, None, None], out[:, :, ::-1], out)
  return out


def cutout(images: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
  """Cutout (DeVries & Taylor 2017): per image one ``size`` x ``size`` window centred at its
  row of ``centres`` ([n, 2]: y, x; drawn uniformly over the image), clipped at the borders,
  set to 0. Applied to normalised images, as there, so the window holds the training mean
  rather than black."""
  _, h, w, _ = images.shape
  top, left = centres[:, 0] - size // 2, centres[:, 1] - size // 2
  rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
  inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
  inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
  window = inside_rows[:, :, None] & inside_cols[:, None, :]
  return np.where(window[..., None], np.zeros((), images.dtype), images)


def steps_per_epoch(dataset: Source, batch_size: int) -> int:
  return shards.steps_per_epoch(dataset.train.num_examples, batch_size)
