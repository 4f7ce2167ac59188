"""What a data set must satisfy before anything trains on it, checked once at start, for
every source alike (Fashion-MNIST, CIFAR, any tfds data set, .npz files): images
[n, h, w(, c)] of uint8 or float, finite; one whole-number label per image in [0, classes);
every split of the training images' shape; pixels that vary; a training split that holds a
batch. A fault is a DataError (or a ConfigError for a config that does not fit the data)
whose one line names where the bad values come from (a file, a key of a file, a data set's
split) and the fix, raised before the workdir is touched.

Streamed data sets (ImageNet) are too large to read at start: their number of classes is
checked against the data set's info up front, and each batch's labels as it is read.
"""

from typing import NamedTuple

import ml_collections
import numpy as np

from pgnas_jax.errors import ConfigError, DataError


class Origin(NamedTuple):
  """How a message names where a split's values come from, and what the user can do."""

  images: str  # e.g. "/data/x.npz, key 'x_train'"
  labels: str
  fix: str


class Raw(NamedTuple):
  """A split as its source holds it, before any check or conversion."""

  images: np.ndarray
  labels: np.ndarray
  origin: Origin


def checked_split(raw: Raw, num_classes: int, image_shape: tuple | None = None) -> tuple:
  """(images uint8 or float32 [n, h, w, c], labels int32 [n]) of ``raw``: HxW images get a
  channel axis. ``image_shape`` (h, w, c), when given, is the shape every image must have
  (the training images'). Raises DataError naming the first fault."""
  images = _checked_images(raw.images, raw.origin)
  labels = _checked_labels(raw.labels, images.shape[0], raw.origin)
  if image_shape is not None and images.shape[1:] != tuple(image_shape):
    raise DataError(
      f'{raw.origin.images} holds images of {_shape(images.shape[1:])} but the '
      f'training images are {_shape(image_shape)}: every split needs the '
      f"training images' shape; {raw.origin.fix}"
    )
  check_labels(labels, num_classes, raw.origin)  # in the type they were stored in
  if images.dtype == np.float32:
    _check_finite(images, raw.origin)
  return images, labels.astype(np.int32)


def _shape(shape: tuple) -> str:
  return 'x'.join(str(d) for d in shape)


def _checked_images(images: np.ndarray, origin: Origin) -> np.ndarray:
  if images.ndim not in (3, 4) or 0 in images.shape[1:]:
    raise DataError(
      f'{origin.images} holds an array of shape {images.shape}: images must be '
      f'[n, height, width] or [n, height, width, channels]; {origin.fix}'
    )
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise DataError(
      f'{origin.images} holds {images.dtype} values: images must be uint8 '
      f'(0 to 255) or float, e.g. .astype(np.uint8) or .astype(np.float32); '
      f'{origin.fix}'
    )
  if images.shape[0] == 0:
    raise DataError(f'{origin.images} holds no images; {origin.fix}')
  if images.ndim == 3:
    images = images[..., None]
  return images if images.dtype == np.uint8 else images.astype(np.float32)


def _checked_labels(labels: np.ndarray, num_images: int, origin: Origin) -> np.ndarray:
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
      f'{origin.labels} holds {labels.dtype} values of shape {labels.shape}: '
      f'labels must be one whole number per image, shape [n] of an integer '
      f'type, e.g. .reshape(-1).astype(np.int64); {origin.fix}'
    )
  if labels.shape[0] != num_images:
    raise DataError(
      f'{origin.labels} holds {labels.shape[0]} labels but {origin.images} '
      f'holds {num_images} images: give every image one label; {origin.fix}'
    )
  return labels


LARGEST_LABEL = int(np.iinfo(np.int32).max)  # labels are int32 on the devices


def check_labels(labels: np.ndarray, num_classes: int, origin: Origin) -> None:
  """Every label in [0, num_classes), checked in the type the labels were stored in."""
  large = np.flatnonzero(labels > LARGEST_LABEL)
  if large.size:
    raise DataError(
      f'{origin.labels}: label {labels[large[0]]} of example {large[0]} is larger than '
      f'{LARGEST_LABEL} ({large.size} such labels): labels are class indices 0 .. '
      f'classes - 1; {origin.fix}'
    )
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise DataError(
      f'{origin.labels}: label {labels[bad[0]]} of example {bad[0]} is outside '
      f'[0, {num_classes}) ({bad.size} such labels); {origin.fix}'
    )


def _check_finite(images: np.ndarray, origin: Origin) -> None:
  bad = ~np.isfinite(images)
  if bad.any():
    first = int(np.flatnonzero(bad.reshape(images.shape[0], -1).any(1))[0])
    raise DataError(
      f'{origin.images}: {int(bad.sum())} pixels are NaN or infinite (the '
      f'first in image {first}): replace them by finite values; {origin.fix}'
    )


def check_spread(images: np.ndarray, origin: Origin) -> None:
  """The training pixels vary in every channel: normalising divides by their deviation."""
  flat = images.reshape(-1, images.shape[-1])
  constant = np.flatnonzero(flat.min(0) == flat.max(0))
  if constant.size:
    raise DataError(
      f'{origin.images}: channel {constant[0]} of the training images is the '
      f'same value everywhere (standard deviation 0), so they cannot be '
      f'normalised: use images whose pixels vary; {origin.fix}'
    )


def check_info_classes(info, num_classes: int, origin: Origin) -> None:
  """A streamed data set's labels, as far as its info says without reading every record."""
  features = info.features  # a FeaturesDict: `in` and [], no .get
  label = features['label'] if 'label' in features else None  # noqa: SIM401
  if getattr(label, 'num_classes', None) != num_classes:
    raise DataError(
      f'{origin.labels} has {getattr(label, "num_classes", "no")} classes in its '
      f'info, not {num_classes}; {origin.fix}'
    )


def check_fits(dataset, train: ml_collections.ConfigDict) -> None:
  """The training split holds a whole training batch (steps are whole batches; an epoch of
  none would never end)."""
  n = dataset.train.num_examples
  if train.batch_size > n:
    raise ConfigError(
      f'--config.train.batch_size={train.batch_size} is larger than the '
      f'training split ({n} images once data.validation_size='
      f'{dataset.validation.num_examples} are held out for ranking): use a '
      f'batch of at most {n} or a smaller data.validation_size'
    )
