"""ImageNet (ILSVRC 2012) from tensorflow-datasets' prepared array_record files. Too large to
hold in memory, so splits are opened for random access and read image by image while
training; tfds decodes each JPEG with PIL."""

from pgnas_jax.data import tfds_source

NAME = 'imagenet2012'
NUM_CLASSES = 1000
# per-channel mean and standard deviation of ImageNet's training images, in [0, 1] units
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _how_to_get(data_dir: str) -> str:
  return (
    f'{NAME} is not prepared as array_record in {tfds_source.where(data_dir)}. ImageNet '
    f'cannot be downloaded automatically: get ILSVRC2012_img_train.tar and '
    f'ILSVRC2012_img_val.tar from https://image-net.org (registration) into a folder '
    f'MANUAL_DIR, then on a machine with TensorFlow run `tfds build {NAME} '
    f'--manual_dir=MANUAL_DIR --file_format=array_record [--data_dir=DIR]` and copy '
    f'DIR/{NAME}/ here, or point --config.data.data_dir at a folder that holds '
    f"{NAME}/<version>/ (an empty data_dir means tfds' default)"
  )


def open_split(data_dir: str, split: str):
  """The tfds data source of 'train' (1,281,167 images) or 'validation' (50,000, the
  official validation set, our test split); ``source[i]`` is a dict with 'image' (uint8
  [h, w, 3], any size) and 'label'."""
  return tfds_source.open_split(NAME, data_dir, split, _how_to_get(data_dir))
