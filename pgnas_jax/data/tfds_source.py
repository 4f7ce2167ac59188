"""Opening a split of a data set that tensorflow-datasets prepared as array_record files.

``tfds.data_source`` gives random access without TensorFlow; preparing the files (``tfds
build``) is what needs TensorFlow, so it happens once, elsewhere or beforehand. A run never
downloads: it must not start a download by surprise. tensorflow_datasets is imported here,
lazily, so the Fashion-MNIST path works without the ``tfds`` extra installed.
"""

import numpy as np

from pgnas_jax.data import checks
from pgnas_jax.errors import DataError, MissingDataError


def where(data_dir: str) -> str:
  """How a message names the data_dir searched."""
  return (
    f'--config.data.data_dir={data_dir}'
    if data_dir
    else "tfds' default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
  )


def how_to_get(name: str, data_dir: str, note: str = '') -> str:
  """What to do when data set ``name`` is not prepared in ``data_dir`` (``note`` adds what
  the caller reads)."""
  return (
    f'{name} is not prepared as array_record (or has no such split) in {where(data_dir)}. '
    f'On a machine with internet and TensorFlow run `tfds build {name} '
    f'--file_format=array_record [--data_dir=DIR]` and copy DIR/{name}/ here, or point '
    f'--config.data.data_dir at a folder that holds {name}/<version>/ (an empty data_dir '
    f"means tfds' default){note}"
  )


def open_split(name: str, data_dir: str, split: str, how_to_get: str):
  """The tfds data source of one split (``len``, ``source[i]`` -> a dict of numpy values);
  ``data_dir`` '' means tfds' default. A missing data set raises MissingDataError with
  ``how_to_get`` and tfds' own reason."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingDataError(
      f'data.name={name!r} reads tensorflow-datasets, which is not '
      f"installed: `pip install -e '.[tfds]'`"
    ) from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds says "not prepared" with several exception types
    raise MissingDataError(f'{how_to_get} (tfds: {str(e).splitlines()[0]})') from e


def rebuild(name: str) -> str:
  """What to do about a prepared data set whose files or values are bad."""
  return (
    f'prepare it again: `tfds build {name} --file_format=array_record` on a machine with '
    f'TensorFlow, and copy it here'
  )


def origin(
  name: str, split: str, image_key: str = 'image', label_key: str = 'label'
) -> checks.Origin:
  """How messages name a split's images and labels."""
  where = f'tfds data set {name!r}, split {split!r}'
  return checks.Origin(
    f'{where}, feature {image_key!r}', f'{where}, feature {label_key!r}', rebuild(name)
  )


def read_whole(
  source, named: checks.Origin, image_key: str = 'image', label_key: str = 'label'
) -> checks.Raw:
  """Every record of ``source`` in memory, as the data set holds them. A record that cannot
  be read (damaged files) raises DataError naming it."""
  records = []
  for i in range(len(source)):
    try:
      records.append(source[i])
    except Exception as e:  # array_record and the decoders raise several types
      reason = (str(e).splitlines() or [type(e).__name__])[0]
      raise DataError(f'{named.images}: record {i} cannot be read ({reason}); {named.fix}') from e
  images = np.stack([np.asarray(r[image_key]) for r in records]) if records else np.zeros(0)
  labels = np.array([r[label_key] for r in records])
  return checks.Raw(images, labels, named)
