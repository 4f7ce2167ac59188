"""Your own data as a NumPy ``.npz`` file (``data.name='npz'``, ``data.path``): arrays
``x_train``, ``y_train``, ``x_test``, ``y_test``; images uint8 (0 to 255) or float, [n, h, w]
or [n, h, w, c]; integer labels in [0, classes). Validation images are carved from the
training part and pixels normalised with the training part's statistics, as for the other
data sets. ``from_fashion_mnist`` writes such a file from a slice of Fashion-MNIST (for tests
and examples)."""

import os
import zipfile
import zlib

import numpy as np

from pgnas_jax.data import checks, fashion_mnist
from pgnas_jax.errors import DataError, MissingDataError

KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def _how_to_write(path: str) -> str:
  return f'write it with numpy.savez({path!r}, x_train=..., y_train=..., x_test=..., y_test=...)'


def _arrays(path: str) -> dict:
  """The four arrays of the file; a damaged file or a missing key raises DataError."""
  if not os.path.isfile(path):
    raise MissingDataError(
      f'--config.data.path={path!r} is not a file: point it at an .npz '
      f'holding {", ".join(KEYS)} ({_how_to_write(path)})'
    )
  try:
    with np.load(path, allow_pickle=False) as f:
      held = list(f.files)
      arrays = {k: f[k] for k in KEYS if k in held}
  except MemoryError as e:  # a header may claim more than the file holds
    raise DataError(
      f'{path} holds arrays larger than this machine can hold in memory ({e}), or a '
      f'damaged header that claims so: {_how_to_write(path)} with arrays that fit'
    ) from None
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(
      f'{path} cannot be read as an .npz file of arrays ({e}), e.g. it is '
      f'truncated or damaged: {_how_to_write(path)}'
    ) from e
  missing = [k for k in KEYS if k not in arrays]
  if missing:
    raise DataError(
      f'{path} has no key {missing[0]!r} (it holds {", ".join(held) or "nothing"}'
      f'): {_how_to_write(path)}'
    )
  return arrays


def _origin(path: str, split: str) -> checks.Origin:
  fix = (
    f'fix the arrays and save {path} again (classes are 0 .. num_classes - 1; '
    f'--config.data.num_classes sets their number, 0: the largest training label + 1)'
  )
  return checks.Origin(f"{path}, key 'x_{split}'", f"{path}, key 'y_{split}'", fix)


def _num_classes(path: str, labels: np.ndarray, num_classes: int) -> int:
  """``num_classes``, or when 0 one more than the largest training label (a label type
  that is not integer is refused later, by the checks)."""
  if num_classes or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
    return num_classes
  inferred = int(labels.max()) + 1
  if inferred < 2:
    raise DataError(
      f"{path}, key 'y_train': every training label is {labels.max()}, a "
      f'single class: label the classes 0 .. classes - 1, with at least two'
    )
  return inferred


def read(path: str, num_classes: int = 0) -> tuple:
  """(train ``checks.Raw``, test ``checks.Raw``, number of classes) of the file at ``path``;
  ``num_classes`` 0: one more than the largest training label."""
  arrays = _arrays(path)
  raws = [
    checks.Raw(arrays[f'x_{s}'], arrays[f'y_{s}'], _origin(path, s)) for s in ('train', 'test')
  ]
  return (*raws, _num_classes(path, arrays['y_train'], num_classes))


def from_fashion_mnist(
  path: str, train_size: int, test_size: int, data_dir: str = '/usr/share/datasets/fashion-mnist'
) -> str:
  """Writes the first ``train_size`` training and ``test_size`` test images of Fashion-MNIST
  (uint8 [n, 28, 28], as a user's grey images would come) and their labels to ``path`` as
  an .npz for ``data.name='npz'``; returns ``path``."""
  train_images, train_labels = fashion_mnist.load(data_dir, 'train')
  test_images, test_labels = fashion_mnist.load(data_dir, 'test')
  with open(path, 'wb') as f:  # a file object: savez would add '.npz' to a path without it
    np.savez(
      f,
      x_train=train_images[:train_size, ..., 0],
      y_train=train_labels[:train_size],
      x_test=test_images[:test_size, ..., 0],
      y_test=test_labels[:test_size],
    )
  return path
