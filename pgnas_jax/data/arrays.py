"""A data set handed over in Python as arrays: the data source ``pgnas_jax.search_network``
takes from a user who holds the images already (the example reads an .npz into one)."""

import numpy as np

from pgnas_jax.data import Dataset, Split, _carve, pixels
from pgnas_jax.errors import DataError


def _check(images: np.ndarray, labels: np.ndarray, split: str, num_classes: int) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise DataError(
      f'{split} images are {images.dtype} {images.shape}: give uint8 pixels of '
      f'shape [n, height, width, channels] (or [n, height, width])'
    )
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
      f'{split} labels are {labels.dtype} {labels.shape}: give one integer label '
      f'per image, shape [{images.shape[0]}]'
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
      f'{split} labels span [{labels.min()}, {labels.max()}]: they must lie in '
      f'[0, {num_classes}); give the right num_classes or relabel'
    )


def from_arrays(
  train_images: np.ndarray,
  train_labels: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  validation_size: int,
) -> Dataset:
  """An in-memory data set from uint8 images ([n, h, w, c] or [n, h, w]) and integer labels:
  ``validation_size`` images carved from the training part as ``data.load`` does, pixels
  normalised with the training part's statistics."""
  images, test_images = (
    x[..., None] if x.ndim == 3 else x for x in (np.asarray(train_images), np.asarray(test_images))
  )
  _check(images, np.asarray(train_labels), 'training', num_classes)
  _check(test_images, np.asarray(test_labels), 'test', num_classes)
  labels = np.asarray(train_labels, np.int32)
  val, train = _carve(images.shape[0], validation_size)
  train_split = Split(images[train], labels[train])
  mean, std = pixels.statistics(train_split.images)
  return Dataset(
    train=train_split,
    validation=Split(images[val], labels[val]),
    test=Split(test_images, np.asarray(test_labels, np.int32)),
    num_classes=num_classes,
    mean=mean,
    std=std,
  )
