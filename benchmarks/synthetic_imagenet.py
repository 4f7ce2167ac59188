"""A synthetic ImageNet in exactly the form ``tfds build imagenet2012 --file_format=array_record``
writes, for rehearsing the ImageNet configs where the real data set is not at hand.

    python -m benchmarks.synthetic_imagenet --data_dir=DIR [--train=2000] [--validation=500]

writes ``DIR/imagenet2012/5.1.0/``: ``dataset_info.json`` and ``features.json`` from tfds'
own ``imagenet2012`` builder (its features: ``image`` JPEG, ``label`` of 1,000 classes,
``file_name``), and the ``train`` and ``validation`` splits as array_record shards named
as tfds names them, each record a serialized example of those features written by tfds'
own serializer. TensorFlow is not needed: tfds serializes JPEG bytes given as they are.
``tfds.data_source('imagenet2012', data_dir=DIR)``, and so ``configs/imagenet_*.py`` with
``--config.data.data_dir=DIR``, read, decode, crop and shard it as they would the real one.

The pictures are smooth random colour fields with noise, saved as JPEG quality 90: decoding
cost follows their size and entropy, which are ImageNet-like (sides drawn around the
data set's mean of about 400x350, aspect ratios from 1:2 to 2:1, a few small and a few
large ones), not what they show. Labels go round all 1,000 classes.
"""

import argparse
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import example_serializer, naming

NAME = 'imagenet2012'
RECORDS_PER_SHARD = 1024


def picture_size(rng) -> tuple:
  """(height, width) of one picture: the area around ImageNet's mean (about 400 x 350
  pixels), an aspect ratio between 1:2 and 2:1, now and then a small or a large one."""
  area = 400 * 350 * rng.choice([0.1, 1.0, 4.0], p=[0.05, 0.9, 0.05]) * rng.uniform(0.6, 1.4)
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # width / height
  height = int(np.clip(np.sqrt(area / aspect), 32, 2000))
  width = int(np.clip(np.sqrt(area * aspect), 32, 2000))
  return height, width


def jpeg(rng, height: int, width: int) -> bytes:
  """A smooth random colour field with noise, as JPEG quality 90."""
  coarse = rng.uniform(0, 255, (max(height // 32, 2), max(width // 32, 2), 3))
  smooth = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
  pixels = np.asarray(smooth, np.float32) + rng.normal(0, 12, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def _write_split(builder, split: str, count: int, rng) -> tfds.core.SplitInfo:
  """Writes ``count`` examples of ``split`` as array_record shards; returns its SplitInfo."""
  template = naming.ShardedFileTemplate(
    data_dir=builder.data_dir,
    dataset_name=NAME,
    split=split,
    filetype_suffix='array_record',
  )
  serializer = example_serializer.ExampleSerializer(builder.info.features.get_serialized_info())
  num_shards = max(1, -(-count // RECORDS_PER_SHARD))
  lengths, num_bytes, index = [], 0, 0
  for shard in range(num_shards):
    path = os.fspath(template.sharded_filepath(shard_index=shard, num_shards=num_shards))
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    n = min(RECORDS_PER_SHARD, count - index)
    for _ in range(n):
      example = {
        'image': jpeg(rng, *picture_size(rng)),
        'label': index % 1000,
        'file_name': f'synthetic_{split}_{index:08d}.JPEG',
      }
      record = serializer.serialize_example(builder.info.features.encode_example(example))
      writer.write(record)
      num_bytes += len(record)
      index += 1
    writer.close()
    lengths.append(n)
  return tfds.core.SplitInfo(
    name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=template
  )


def write(data_dir: str, train: int, validation: int, seed: int = 0) -> str:
  """Writes the data set under ``data_dir``; returns its folder."""
  builder = tfds.builder(NAME, data_dir=data_dir, file_format='array_record')
  os.makedirs(builder.data_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = [
    _write_split(builder, s, n, rng) for s, n in (('train', train), ('validation', validation))
  ]
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(builder.data_dir)
  return builder.data_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.synthetic_imagenet')
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--train', type=int, default=2000)
  parser.add_argument('--validation', type=int, default=500)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  print(write(args.data_dir, args.train, args.validation, args.seed))


if __name__ == '__main__':
  main()
