"""The config schema: every field, its default (the embedded default run), and validation.

``get_config()`` is the embedded default: SupNet-M family at a size that trains usefully on
2 CPU cores, on Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package. Config files in
``configs/`` start from it and override fields; ``validate`` runs once at start.
"""
import importlib.util
import os
import types

import ml_collections

from pgnas_jax.errors import ConfigError

# ENAS's published CIFAR-10 micro cells (SPEC section 5): per node, input, op, input, op;
# inputs 0 and 1 are the cell's inputs, node j >= 2 is the j-th built; ops 0 sep3x3,
# 1 sep5x5, 2 avg3x3, 3 max3x3, 4 identity
ENAS_NORMAL_ARC = (0, 2, 0, 0, 0, 4, 0, 1, 0, 4, 1, 1, 1, 0, 0, 1, 0, 2, 1, 1)
ENAS_REDUCTION_ARC = (1, 0, 1, 0, 0, 3, 0, 2, 1, 1, 3, 1, 1, 0, 0, 4, 0, 3, 1, 1)
ENAS_NUM_OPS = 5


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'fashion_mnist'
  c.data.data_dir = '/usr/share/datasets/fashion-mnist'  # tfds: data_dir, '' its default
  c.data.validation_size = 5000  # carved from the training split, held out for ranking
  c.data.random_flip = True
  c.data.pad_crop = 0  # pad by this many pixels and crop back at random; 0: off
  c.data.cutout = 0  # side of the square zeroed per training image (DeVries & Taylor); 0: off
  c.data.image_size = 224  # imagenet2012 only: side of the square crops the network sees

  c.model = ml_collections.ConfigDict()
  c.model.family = 'shake_shake'  # which of the sub-configs below builds the super-network
  # 'bfloat16': mixed precision (convs and activations in bf16; parameters, optimiser state,
  # BatchNorm statistics, masks and the loss in float32), for training and ranking alike
  c.model.compute_dtype = 'float32'
  c.model.shake_shake = ml_collections.ConfigDict()  # SupNet-M family
  c.model.shake_shake.stem_width = 16
  c.model.shake_shake.widths = (16, 32, 64)
  c.model.shake_shake.blocks_per_stage = 1
  c.model.shake_shake.kernel_sizes = (3, 3)  # one per branch
  c.model.shake_shake.shake = True
  c.model.enas = ml_collections.ConfigDict()  # SupNet-E (filters 36) / SupNet-EI (filters 72)
  c.model.enas.filters = 36
  c.model.enas.normal_cells_per_stage = 5
  c.model.enas.normal_arc = ENAS_NORMAL_ARC
  c.model.enas.reduction_arc = ENAS_REDUCTION_ARC
  c.model.enas.auxiliary_head = True
  c.model.resnet = ml_collections.ConfigDict()  # SupNet-R-50
  c.model.resnet.stem_width = 64
  c.model.resnet.widths = (64, 128, 256, 512)  # bottleneck widths; block outputs are 4x
  c.model.resnet.blocks_per_stage = (3, 4, 6, 3)
  c.model.resnet.kernel_sizes = (1, 3, 3, 5)  # one per branch of a multi-kernel block
  c.model.resnet.dilations = (1, 1, 2, 2)
  c.model.densenet = ml_collections.ConfigDict()  # SupNet-D-121
  c.model.densenet.stem_width = 64
  c.model.densenet.blocks = (6, 12, 24, 16)  # dense layers per block
  c.model.densenet.growth_rate = 32
  c.model.densenet.bottleneck_width = 128
  c.model.densenet.compression = 0.5

  c.drop = ml_collections.ConfigDict()
  c.drop.mode = 'learned'  # 'learned' (PGNAS) or 'random' (logits frozen at random_p)
  c.drop.init_p = 0.1
  c.drop.random_p = 0.1
  c.drop.tau = 0.2
  c.drop.logit_lr_multiplier = 1.0

  c.objective = ml_collections.ConfigDict()
  c.objective.prior = 'posterior'  # 'posterior': l2 (1 - p); 'constant': constant_l2
  c.objective.weight_prior_l2 = 50.0
  c.objective.constant_l2 = 45.0
  c.objective.num_train_effective = 55000.0  # N of SPEC section 2
  c.objective.weight_decay = 0.0  # on non-searchable kernels only
  c.objective.auxiliary_weight = 0.4  # of auxiliary classifiers' loss (SupNet-E/EI; ENAS: 0.4)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 5.0
  c.train.num_steps = -1  # > 0 overrides num_epochs
  c.train.learning_rate = 0.1
  c.train.schedule = 'cosine'  # 'cosine', 'step' or 'sgdr'
  c.train.step_epochs = (30, 60, 90)  # 'step': lr /= step_factor at these epochs
  c.train.step_factor = 10.0
  c.train.sgdr_min_lr = 1e-4
  c.train.sgdr_t0_epochs = 10.0
  c.train.sgdr_t_mul = 2.0
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.train.log_every_steps = 50

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # also at the end of training and on SIGTERM
  c.checkpoint.max_to_keep = 3

  c.search = ml_collections.ConfigDict()
  c.search.num_candidates = 100
  # candidates scored at once (vmap), split over the devices: a multiple of the device count,
  # or 'auto' (search.auto_chunk_size: from the platform's best images per call and the free
  # device memory)
  c.search.chunk_size = ml_collections.FieldReference('auto', field_type=object)
  c.search.eval_batch_size = 100

  c.finetune = ml_collections.ConfigDict()  # of the winner, after the choice (SPEC section 3)
  c.finetune.steps = 0  # 0: off (the paper's headline protocol)
  c.finetune.learning_rate = 0.01  # peak, cosine to 0 over the steps

  c.log = ml_collections.ConfigDict()  # what a run shows besides its results
  c.log.tensorboard = True  # event files in WORKDIR/tensorboard/ when tensorboardX is installed
  c.log.profile_steps = ()  # training steps (from 1) traced with jax.profiler to WORKDIR/profile/
  return c


def read_config_file(path: str) -> types.ModuleType:
  """A config file (``configs/*.py``) as a module: its docstring says how to run it and what
  the paper reports, its ``get_config()`` builds the config, as ``--config=PATH`` does."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_ENAS_ARC = ('4 numbers per node (input, op, input, op): node j (from 0) reads inputs '
             f'0 .. j + 1, ops 0 .. {ENAS_NUM_OPS - 1}')


def _is_enas_arc(arc) -> bool:
  if len(arc) == 0 or len(arc) % 4:
    return False
  for j in range(len(arc) // 4):
    inputs, ops = (arc[4 * j], arc[4 * j + 2]), (arc[4 * j + 1], arc[4 * j + 3])
    if not all(0 <= i < j + 2 for i in inputs) or not all(0 <= o < ENAS_NUM_OPS for o in ops):
      return False
  return True


CHOICES = {
    'data.name': ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012'),
    'model.family': ('shake_shake', 'enas', 'resnet', 'densenet'),
    'model.compute_dtype': ('float32', 'bfloat16'),
    'drop.mode': ('learned', 'random'),
    'objective.prior': ('posterior', 'constant'),
    'train.schedule': ('cosine', 'step', 'sgdr'),
}

# field -> (test, what the value must be)
RANGES = {
    'data.validation_size': (lambda v: v > 0, 'a positive number of images'),
    'data.pad_crop': (lambda v: v >= 0, '>= 0'),
    'data.cutout': (lambda v: v >= 0, '>= 0'),
    'data.image_size': (lambda v: v > 0, '> 0'),
    'model.shake_shake.stem_width': (lambda v: v > 0, '> 0'),
    'model.shake_shake.widths': (lambda v: len(v) > 0 and all(w > 0 for w in v),
                                 'non-empty, each > 0'),
    'model.shake_shake.blocks_per_stage': (lambda v: v > 0, '> 0'),
    'model.shake_shake.kernel_sizes': (lambda v: len(v) > 0 and all(k > 0 and k % 2 == 1 for k in v),
                           'non-empty, each an odd number > 0'),
    'model.enas.filters': (lambda v: v > 0, '> 0'),
    'model.enas.normal_cells_per_stage': (lambda v: v > 0, '> 0'),
    'model.enas.normal_arc': (_is_enas_arc, _ENAS_ARC),
    'model.enas.reduction_arc': (_is_enas_arc, _ENAS_ARC),
    'model.resnet.stem_width': (lambda v: v > 0, '> 0'),
    'model.resnet.widths': (lambda v: len(v) > 0 and all(w > 0 for w in v), 'non-empty, each > 0'),
    'model.resnet.blocks_per_stage': (lambda v: len(v) > 0 and all(b > 0 for b in v),
                                      'non-empty, each > 0'),
    'model.resnet.kernel_sizes': (lambda v: len(v) > 0 and all(k > 0 and k % 2 == 1 for k in v),
                                  'non-empty, each an odd number > 0'),
    'model.resnet.dilations': (lambda v: len(v) > 0 and all(d > 0 for d in v),
                               'non-empty, each > 0'),
    'model.densenet.stem_width': (lambda v: v > 0, '> 0'),
    'model.densenet.blocks': (lambda v: len(v) > 0 and all(b > 0 for b in v),
                              'non-empty, each > 0'),
    'model.densenet.growth_rate': (lambda v: v > 0, '> 0'),
    'model.densenet.bottleneck_width': (lambda v: v > 0, '> 0'),
    'model.densenet.compression': (lambda v: 0.0 < v <= 1.0, 'in (0, 1]'),
    'drop.init_p': (lambda v: 0.0 < v < 1.0, 'in (0, 1)'),
    'drop.random_p': (lambda v: 0.0 < v < 1.0, 'in (0, 1)'),
    'drop.tau': (lambda v: v > 0.0, '> 0'),
    'drop.logit_lr_multiplier': (lambda v: v >= 0.0, '>= 0'),
    'objective.weight_prior_l2': (lambda v: v >= 0.0, '>= 0'),
    'objective.constant_l2': (lambda v: v >= 0.0, '>= 0'),
    'objective.num_train_effective': (lambda v: v > 0.0, '> 0'),
    'objective.weight_decay': (lambda v: v >= 0.0, '>= 0'),
    'objective.auxiliary_weight': (lambda v: v >= 0.0, '>= 0'),
    'train.batch_size': (lambda v: v > 0, '> 0'),
    'train.num_epochs': (lambda v: v > 0.0, '> 0'),
    'train.learning_rate': (lambda v: v > 0.0, '> 0'),
    'train.step_factor': (lambda v: v > 0.0, '> 0'),
    'train.sgdr_t0_epochs': (lambda v: v > 0.0, '> 0'),
    'train.sgdr_t_mul': (lambda v: v >= 1.0, '>= 1'),
    'train.momentum': (lambda v: 0.0 <= v < 1.0, 'in [0, 1)'),
    'train.log_every_steps': (lambda v: v > 0, '> 0'),
    'checkpoint.every_steps': (lambda v: v > 0, '> 0'),
    'checkpoint.max_to_keep': (lambda v: v > 0, '> 0'),
    'search.num_candidates': (lambda v: v > 0, '> 0'),
    'search.chunk_size': (lambda v: v == 'auto' or (type(v) is int and v >= 1),
                          "'auto' or a whole number >= 1"),
    'search.eval_batch_size': (lambda v: v > 0, '> 0'),
    'finetune.steps': (lambda v: v >= 0, '>= 0 (0: no fine-tuning)'),
    'finetune.learning_rate': (lambda v: v > 0.0, '> 0'),
    'log.tensorboard': (lambda v: type(v) is bool, 'True or False'),
    'log.profile_steps': (lambda v: all(type(s) is int and s >= 1 for s in v),
                          'a tuple of training steps, each a whole number >= 1, e.g. (11, 12)'),
}


# checks across fields: (fields, test of their values, what must hold)
CONSTRAINTS = (
    (('data.name', 'data.pad_crop', 'data.cutout'),
     lambda name, pad_crop, cutout: name != 'imagenet2012' or pad_crop == cutout == 0,
     'imagenet2012 is augmented by random-resized crop and flip only: set pad_crop and '
     'cutout to 0'),
    (('model.resnet.kernel_sizes', 'model.resnet.dilations'),
     lambda k, d: len(k) == len(d), 'one dilation per kernel size'),
    (('model.resnet.widths', 'model.resnet.blocks_per_stage'),
     lambda w, b: len(w) == len(b), 'one number of blocks per width'),
    (('model.resnet.widths', 'model.resnet.kernel_sizes'),
     lambda w, k: all(x % len(k) == 0 for x in w),
     'every width a multiple of the number of branches (each gets an equal share)'),
)

def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and the fix."""
  reference = get_config()
  ref_keys = set(_flat_keys(reference))
  for key in _flat_keys(config):
    if key not in ref_keys:
      raise ConfigError(f'unknown config field {key!r}: remove it or check its spelling '
                        f'(fields are listed in README.md, "Config fields")')
  for key in ref_keys - set(_flat_keys(config)):
    raise ConfigError(f'config field {key!r} is missing: start config files from '
                      f'pgnas_jax.config.get_config() and override fields')
  for key, options in CHOICES.items():
    if _get(config, key) not in options:
      raise ConfigError(f'--config.{key}={_get(config, key)!r} is not one of {options}')
  for key, (ok, what) in RANGES.items():
    if not ok(_get(config, key)):
      raise ConfigError(f'--config.{key}={_get(config, key)!r} is out of range: it must be {what}')
  for keys, ok, what in CONSTRAINTS:
    if not ok(*(_get(config, k) for k in keys)):
      values = ', '.join(f'--config.{k}={_get(config, k)!r}' for k in keys)
      raise ConfigError(f'{values} do not fit together: {what}')


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Global batches and chunks of candidates are split evenly over the devices."""
  for key in ('train.batch_size', 'search.eval_batch_size', 'search.chunk_size'):
    if _get(config, key) != 'auto' and _get(config, key) % num_devices:
      raise ConfigError(f'--config.{key}={_get(config, key)} does not split over {num_devices} '
                        f'devices: use a multiple of {num_devices}')


def _flat_keys(config, prefix=''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'
