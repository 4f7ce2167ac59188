"""Any tensorflow-datasets image-classification data set by name (``data.name='tfds:NAME'``),
prepared as array_record files as CIFAR is, and read whole into memory: its 'train' and
'test' splits, its image shape and number of classes from the data set's info."""

from pgnas_jax.data import tfds_source
from pgnas_jax.errors import DataError

PREFIX = 'tfds:'


def _features(name: str, info) -> tuple:
  """(image key, label key, number of classes, image shape) of an image-classification data
  set, from its info."""
  keys = info.supervised_keys
  image_key, label_key = (
    keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
    else ('image', 'label')
  )
  features = info.features  # a FeaturesDict: `in` and [], no .get
  image = features[image_key] if image_key in features else None  # noqa: SIM401
  label = features[label_key] if label_key in features else None  # noqa: SIM401
  if getattr(image, 'shape', None) is None or getattr(label, 'num_classes', None) is None:
    raise DataError(
      f'tfds data set {name!r} is not an image-classification data set (its '
      f"features: {', '.join(features.keys())}): data.name='tfds:NAME' needs "
      f'an image feature and a class label, e.g. tfds:mnist or tfds:svhn_cropped'
    )
  shape = tuple(image.shape)
  if len(shape) != 3 or None in shape:
    raise DataError(
      f'tfds data set {name!r} has images of shape {shape} (None: varying): '
      f"data.name='tfds:NAME' reads data sets whose images all have one "
      f"height, width and channel count (ImageNet: data.name='imagenet2012')"
    )
  return image_key, label_key, int(label.num_classes), shape


def read(data_name: str, data_dir: str) -> tuple:
  """(train ``checks.Raw``, test ``checks.Raw``, number of classes, image shape) of
  ``data_name`` ('tfds:NAME'); ``data_dir`` '' means tfds' default."""
  name = data_name[len(PREFIX) :]
  how = tfds_source.how_to_get(
    name, data_dir, "; data.name='tfds:NAME' reads the splits train and test"
  )
  train = tfds_source.open_split(name, data_dir, 'train', how)
  image_key, label_key, num_classes, shape = _features(name, train.dataset_info)
  test = tfds_source.open_split(name, data_dir, 'test', how)
  raws = [
    tfds_source.read_whole(
      source, tfds_source.origin(name, split, image_key, label_key), image_key, label_key
    )
    for split, source in (('train', train), ('test', test))
  ]
  return (*raws, num_classes, shape)
