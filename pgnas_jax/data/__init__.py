"""Input pipeline: train / held-out validation / test splits and deterministic batches.

The validation split is carved from the training split by a fixed permutation (the same for
every seed, so runs with different seeds rank on the same images) and never trained on. The
test split is touched once, for the winner's final report. Training batches depend only on
(seed, step): a run restarted at step s sees the same stream.
"""
from collections.abc import Iterator
from typing import NamedTuple

import ml_collections
import numpy as np

from pgnas_jax.data import cifar, fashion_mnist
from pgnas_jax.errors import ConfigError

SPLIT_SEED = 20200207  # fixes the validation carve-out for every run


class Split(NamedTuple):
  images: np.ndarray  # uint8 [n, h, w, c]
  labels: np.ndarray  # int32 [n]


class Dataset(NamedTuple):
  train: Split
  validation: Split
  test: Split
  num_classes: int
  mean: np.ndarray  # per channel, of the training split, in [0, 1] units
  std: np.ndarray


def _read(data: ml_collections.ConfigDict, split: str):
  if data.name == 'fashion_mnist':
    return fashion_mnist.load(data.data_dir, split)
  if data.name in cifar.NUM_CLASSES:
    return cifar.load(data.name, data.data_dir, split)
  raise ConfigError(f'unknown data.name {data.name!r}')


def load(data: ml_collections.ConfigDict) -> Dataset:
  images, labels = _read(data, 'train')
  if data.validation_size >= images.shape[0]:
    raise ConfigError(f'--config.data.validation_size={data.validation_size} leaves no '
                     f'training images (the training split has {images.shape[0]})')
  order = np.random.default_rng(SPLIT_SEED).permutation(images.shape[0])
  val, train = order[:data.validation_size], order[data.validation_size:]
  test = Split(*_read(data, 'test'))
  train_split = Split(images[train], labels[train])
  pixels = train_split.images.reshape(-1, train_split.images.shape[-1]) / 255.0
  return Dataset(train=train_split, validation=Split(images[val], labels[val]), test=test,
                 num_classes=cifar.NUM_CLASSES.get(data.name, fashion_mnist.NUM_CLASSES),
                 mean=pixels.mean(0).astype(np.float32), std=pixels.std(0).astype(np.float32))


def normalise(images: np.ndarray, dataset: Dataset) -> np.ndarray:
  return ((images.astype(np.float32) / 255.0 - dataset.mean) / dataset.std).astype(np.float32)


def augment(images: np.ndarray, rng: np.random.Generator, data: ml_collections.ConfigDict):
  """Random pad-and-crop and horizontal flip, per image."""
  n, h, w, _ = images.shape
  out = images
  if data.pad_crop > 0:
    p = data.pad_crop
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if data.random_flip:
    flip = rng.random(n) < 0.5
    out = np.where(flip[:, None, None, None], out[:, :, ::-1], out)
  return out


def cutout(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """Cutout (DeVries & Taylor 2017): per image one ``size`` x ``size`` window, its centre
  uniform over the image, clipped at the borders, set to 0. Applied to normalised images, as
  there, so the window holds the training mean rather than black."""
  n, h, w, _ = images.shape
  cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
  top, left = cy - size // 2, cx - size // 2
  rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
  inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
  inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
  window = inside_rows[:, :, None] & inside_cols[:, None, :]
  return np.where(window[..., None], np.zeros((), images.dtype), images)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
  return dataset.train.images.shape[0] // batch_size


def train_batch(dataset: Dataset, data: ml_collections.ConfigDict, seed: int, step: int,
                batch_size: int) -> dict:
  """The batch of training step ``step``: epochs are fresh permutations from (seed, epoch).
  Pad-crop and flip act on the raw pixels, cutout after normalisation (zero is the mean)."""
  per_epoch = steps_per_epoch(dataset, batch_size)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(dataset.train.images.shape[0])
  index = np.sort(order[position * batch_size:(position + 1) * batch_size])
  rng = np.random.default_rng([seed, epoch, position])
  images = normalise(augment(dataset.train.images[index], rng, data), dataset)
  if data.cutout > 0:
    images = cutout(images, rng, data.cutout)
  return {'images': images, 'labels': dataset.train.labels[index]}


def eval_batches(split: Split, dataset: Dataset, batch_size: int) -> Iterator[dict]:
  """Fixed-size batches over a whole split; the last is padded and ``weights`` marks real
  examples, so every batch has one shape (one compilation)."""
  n = split.images.shape[0]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    images = np.pad(split.images[start:stop], ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = np.pad(split.labels[start:stop], (0, pad))
    weights = np.pad(np.ones(stop - start, np.float32), (0, pad))
    yield {'images': normalise(images, dataset), 'labels': labels, 'weights': weights}
