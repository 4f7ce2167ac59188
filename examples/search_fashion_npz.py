"""Searches an example network on Fashion-MNIST given as an .npz file.

    python -m examples.search_fashion_npz --workdir=/tmp/pgnas_small_vgg [--model=vit]

writes the .npz (``x_train``, ``y_train``, ``x_test``, ``y_test``: uint8 images HxW,
integer labels) from Debian's ``dataset-fashion-mnist`` if ``--npz`` does not exist, reads
it into an in-memory data source (``pgnas_jax.from_arrays``) and runs the main job on it
with ``pgnas_jax.search_network``: the workdir is the command line's (docs/workdir.md).
``--model`` picks the network (``MODELS``): examples/tiny_cnn.py's SmallVGG, the same
network written with Flax NNX (examples/tiny_cnn_nnx.py) or examples/tiny_vit.py's TinyViT;
``--kwargs`` gives its arguments as a JSON object. Run it from the repository root, so that
config.json's ``examples.<file>:<Class>`` imports. Smaller sizes (``--train_images``,
``--steps``, ...) make the CI run.
"""

import argparse
import json
import os

import numpy as np
from absl import app, flags, logging

import pgnas_jax
from examples import tiny_cnn, tiny_cnn_nnx, tiny_vit
from pgnas_jax import cli
from pgnas_jax import config as config_lib
from pgnas_jax.data import fashion_mnist


MODELS = {
  'vgg': tiny_cnn.SmallVGG,
  'vgg_nnx': tiny_cnn_nnx.SmallVGG,
  'vit': tiny_vit.TinyViT,
}


def build_model(name: str, kwargs: dict, num_classes: int):
  """``MODELS[name](num_classes, **kwargs)``; an NNX class through ``from_nnx``."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if name == 'vgg_nnx':
    return pgnas_jax.from_nnx(MODELS[name], num_classes=num_classes, **kwargs)
  return MODELS[name](num_classes=num_classes, **kwargs)


def write_npz(path: str, data_dir: str) -> None:
  """Fashion-MNIST's IDX files as one .npz, images without a channel axis."""
  (x_train, y_train), (x_test, y_test) = (
    fashion_mnist.load(data_dir, split) for split in ('train', 'test')
  )
  np.savez(path, x_train=x_train[..., 0], y_train=y_train, x_test=x_test[..., 0], y_test=y_test)


def read_npz(path: str, train_images: int, test_images: int, validation_size: int):
  """The data source: the first ``train_images`` and ``test_images`` of the file."""
  with np.load(path) as f:
    x_train, y_train = f['x_train'][:train_images], f['y_train'][:train_images]
    x_test, y_test = f['x_test'][:test_images], f['y_test'][:test_images]
  return pgnas_jax.from_arrays(
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes=int(y_train.max()) + 1,
    validation_size=validation_size,
  )


def make_config(args: argparse.Namespace, num_train: int):
  config = config_lib.get_config()
  config.data.validation_size = args.validation_images
  config.train.batch_size = args.batch_size
  config.train.num_epochs = args.epochs
  config.train.num_steps = args.steps
  config.train.log_every_steps = min(50, args.steps) if args.steps > 0 else 50
  config.objective.num_train_effective = float(num_train)
  config.search.num_candidates = args.candidates
  config.search.eval_batch_size = args.eval_batch_size
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m examples.search_fashion_npz', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--npz', default='/tmp/fashion_mnist.npz')
  parser.add_argument('--data_dir', default='/usr/share/datasets/fashion-mnist')
  parser.add_argument('--model', choices=sorted(MODELS), default='vgg')
  parser.add_argument('--kwargs', default='{}', help="the model's arguments, a JSON object")
  parser.add_argument('--train_images', type=int, default=60000)
  parser.add_argument('--test_images', type=int, default=10000)
  parser.add_argument('--validation_images', type=int, default=5000)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--epochs', type=float, default=3.0)
  parser.add_argument('--steps', type=int, default=-1, help='> 0 overrides --epochs')
  parser.add_argument('--candidates', type=int, default=100)
  parser.add_argument('--eval_batch_size', type=int, default=100)
  args = parser.parse_args(argv)
  if not os.path.exists(args.npz):
    write_npz(args.npz, args.data_dir)
  data = read_npz(args.npz, args.train_images, args.test_images, args.validation_images)
  model = build_model(args.model, json.loads(args.kwargs), data.num_classes)
  config = make_config(args, data.train.num_examples)
  return pgnas_jax.search_network(model, data, config, args.workdir)


def _cli(argv):
  logging.get_absl_handler().addFilter(cli.quiet_libraries)  # the main job's progress log
  print(json.dumps(main(argv[1:]).arch))


def _absl_defaults(argv):
  flags.FLAGS(argv[:1])  # absl's own flags at their defaults; ours are argparse's, above
  return argv


if __name__ == '__main__':
  app.run(_cli, flags_parser=_absl_defaults)
