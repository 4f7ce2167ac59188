"""CIFAR-10 and CIFAR-100 from tensorflow-datasets' prepared array_record files, read whole
into memory (50,000 + 10,000 images of 32x32x3)."""

import numpy as np

from pgnas_jax.data import checks, tfds_source

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


def load(name: str, data_dir: str, split: str):
  """(images uint8 [n, 32, 32, 3], labels int32 [n]) of 'train' or 'test'; ``data_dir`` ''
  means tfds' default."""
  raw = read(name, data_dir, split)
  return raw.images.astype(np.uint8), raw.labels.astype(np.int32)


def read(name: str, data_dir: str, split: str) -> checks.Raw:
  """``split`` as the data set holds it, for ``checks.checked_split``."""
  source = tfds_source.open_split(name, data_dir, split, tfds_source.how_to_get(name, data_dir))
  return tfds_source.read_whole(source, tfds_source.origin(name, split))
