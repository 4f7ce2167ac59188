"""The paper's protocols that several config files share (supplement sections 1.1 and 1.2;
SPEC.md section 6). Not a config itself (it has no ``get_config``): a config file builds on it
with ``config_lib.read_sibling(__file__, 'common')``, since configs/ is not a package.
"""

from pgnas_jax import config as config_lib


def _paper_setup(dataset, validation_size, num_train_effective):
  """What every paper setup shares: tfds data, flips, the drop and prior settings, 1500
  candidates."""
  c = config_lib.get_config()
  c.data.name = dataset
  c.data.data_dir = ''  # tfds' default: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.validation_size = validation_size
  c.data.random_flip = True
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.num_train_effective = num_train_effective
  c.objective.weight_decay = 0.0
  c.search.num_candidates = 1500
  return c


def cifar(dataset):
  """CIFAR-10 or CIFAR-100: 5,000 training images held out for ranking, pad 4 + random crop,
  flip and cutout 16, N 5e5."""
  c = _paper_setup(dataset, 5000, 5e5)
  c.data.pad_crop = 4
  c.data.cutout = 16
  return c


def imagenet():
  """ImageNet: 50,000 training images held out for ranking, 224x224 random-resized crops and
  flips, N 1.2e6, SGD Nesterov from lr 0.1 divided by 10 at the config's step_epochs."""
  c = _paper_setup('imagenet2012', 50000, 1.2e6)
  c.data.image_size = 224
  c.data.pad_crop = 0
  c.data.cutout = 0
  c.train.learning_rate = 0.1
  c.train.schedule = 'step'
  c.train.step_factor = 10.0
  c.train.momentum = 0.9
  c.train.nesterov = True
  return c
