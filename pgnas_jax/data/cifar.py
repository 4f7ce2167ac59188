"""CIFAR-10 and CIFAR-100 from tensorflow-datasets' prepared array_record files.

Read with ``tfds.data_source`` (random access, no TensorFlow needed); preparing the files
(``tfds build``) is what needs TensorFlow and the internet, so it happens once, elsewhere or
beforehand. tensorflow_datasets is imported here, lazily, so the Fashion-MNIST path works
without the ``tfds`` extra installed.
"""
import numpy as np

from pgnas_jax.errors import MissingDataError

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


def _how_to_get(name: str, data_dir: str) -> str:
  where = (f'--config.data.data_dir={data_dir}' if data_dir else
           "tfds' default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)")
  return (f'{name} is not prepared as array_record in {where}. On a machine with internet '
          f'and TensorFlow run `tfds build {name} --file_format=array_record '
          f'[--data_dir=DIR]` and copy DIR/{name}/ here, or point --config.data.data_dir at '
          f'a folder that holds {name}/<version>/ (an empty data_dir means tfds\' default)')


def load(name: str, data_dir: str, split: str):
  """(images uint8 [n, 32, 32, 3], labels int32 [n]) of 'train' or 'test'; ``data_dir`` ''
  means tfds' default. Never downloads: a run must not start a download by surprise."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingDataError(f'data.name={name!r} reads tensorflow-datasets, which is not '
                           f"installed: `pip install -e '.[tfds]'`") from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds says "not prepared" with several exception types
    raise MissingDataError(f'{_how_to_get(name, data_dir)} (tfds: {str(e).splitlines()[0]})'
                           ) from e
  records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records]).astype(np.uint8)
  labels = np.array([r['label'] for r in records], np.int32)
  return images, labels
