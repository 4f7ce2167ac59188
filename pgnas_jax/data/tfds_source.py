"""Opening a split of a data set that tensorflow-datasets prepared as array_record files.

``tfds.data_source`` gives random access without TensorFlow; preparing the files (``tfds
build``) is what needs TensorFlow, so it happens once, elsewhere or beforehand. A run never
downloads: it must not start a download by surprise. tensorflow_datasets is imported here,
lazily, so the Fashion-MNIST path works without the ``tfds`` extra installed.
"""
from pgnas_jax.errors import MissingDataError


def where(data_dir: str) -> str:
  """How a message names the data_dir searched."""
  return (f'--config.data.data_dir={data_dir}' if data_dir else
          "tfds' default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)")


def open_split(name: str, data_dir: str, split: str, how_to_get: str):
  """The tfds data source of one split (``len``, ``source[i]`` -> a dict of numpy values);
  ``data_dir`` '' means tfds' default. A missing data set raises MissingDataError with
  ``how_to_get`` and tfds' own reason."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingDataError(f'data.name={name!r} reads tensorflow-datasets, which is not '
                           f"installed: `pip install -e '.[tfds]'`") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds says "not prepared" with several exception types
    raise MissingDataError(f'{how_to_get} (tfds: {str(e).splitlines()[0]})') from e
