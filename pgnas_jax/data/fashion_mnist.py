"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package."""
import gzip
import os

import numpy as np

from pgnas_jax.errors import MissingDataError

FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
NUM_CLASSES = 10


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path} is not an IDX file of unsigned bytes')
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f'{path} is truncated: expected {int(np.prod(dims))} values, '
                     f'found {body.size}; reinstall the data package')
  return body.reshape(dims)


def load(data_dir: str, split: str):
  """(images uint8 [n, 28, 28, 1], labels int32 [n]) of 'train' or 'test'."""
  paths = [os.path.join(data_dir, f) for f in FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise MissingDataError(
        f'Fashion-MNIST file {missing[0]} not found. Install it with '
        f'`apt-get install dataset-fashion-mnist` (Debian), or point --config.data.data_dir '
        f'at a folder holding {", ".join(FILES["train"] + FILES["test"])}.')
  images, labels = (_read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{paths[0]} has {images.shape[0]} images but {paths[1]} has '
                     f'{labels.shape[0]} labels; reinstall the data package')
  return images[..., None], labels.astype(np.int32)
