"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package."""

import gzip
import os
import zlib

import numpy as np

from pgnas_jax.data import checks
from pgnas_jax.errors import DataError, MissingDataError

FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
NUM_CLASSES = 10


REINSTALL = (
  'reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) or point '
  '--config.data.data_dir at an intact copy'
)


def _read_idx(path: str) -> np.ndarray:
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip says "truncated" or "corrupt" thus
    raise DataError(f'Fashion-MNIST file {path} cannot be read ({e}); {REINSTALL}') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f'Fashion-MNIST file {path} is not an IDX file of unsigned bytes; {REINSTALL}')
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)]
  body = np.frombuffer(data, np.uint8, offset=min(4 + 4 * ndim, len(data)))
  if body.size != int(np.prod(dims)):
    raise DataError(
      f'Fashion-MNIST file {path} is truncated: expected {int(np.prod(dims))} '
      f'values, found {body.size}; {REINSTALL}'
    )
  return body.reshape(dims)


def origin(data_dir: str, split: str) -> checks.Origin:
  """How messages name the files of ``split``."""
  images, labels = (f'Fashion-MNIST file {os.path.join(data_dir, f)}' for f in FILES[split])
  return checks.Origin(images, labels, REINSTALL)


def load(data_dir: str, split: str):
  """(images uint8 [n, 28, 28, 1], labels int32 [n]) of 'train' or 'test'."""
  paths = [os.path.join(data_dir, f) for f in FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise MissingDataError(
      f'Fashion-MNIST file {missing[0]} not found. Install it with '
      f'`apt-get install dataset-fashion-mnist` (Debian), or point --config.data.data_dir '
      f'at a folder holding {", ".join(FILES["train"] + FILES["test"])}.'
    )
  images, labels = (_read_idx(p) for p in paths)
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(
      f'Fashion-MNIST files {paths[0]} and {paths[1]} hold arrays of '
      f'{images.ndim} and {labels.ndim} dimensions, not images [n, h, w] and '
      f'labels [n]; {REINSTALL}'
    )
  if images.shape[0] != labels.shape[0]:
    raise DataError(
      f'{paths[0]} has {images.shape[0]} images but {paths[1]} has '
      f'{labels.shape[0]} labels; {REINSTALL}'
    )
  return images[..., None], labels.astype(np.int32)


def read(data_dir: str, split: str) -> checks.Raw:
  """``split`` as the files hold it, for ``checks.checked_split``."""
  return checks.Raw(*load(data_dir, split), origin(data_dir, split))
