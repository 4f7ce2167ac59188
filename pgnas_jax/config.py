"""The config schema: every field, its default (the embedded default run), and validation.

``FIELDS`` is the one place a field of the run is declared: its dotted name, default,
allowed values and one-line meaning; a super-network family declares its own
(``supernets``), and ``fields()`` is all of them. ``get_config()`` (the embedded default:
SupNet-M family at a size that trains usefully on 2 CPU cores, on Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` package), ``validate`` (run once at start) and the table
in ``docs/config.md`` (``pgnas_jax.config_doc``) are all built from them, so a new field is
one ``Field`` entry.
Config files in ``configs/`` start from ``get_config()`` and override fields.
"""

import dataclasses
import importlib.util
import json
import os
import types

import ml_collections
from flax import traverse_util

from pgnas_jax import budget, estimators, rng, samplers, supernets
from pgnas_jax import data as data_lib
from pgnas_jax.errors import ConfigError
from pgnas_jax.schema import (  # noqa: F401  (the schema's names, re-exported)
  AUTO_OR_COUNT,
  EACH_ODD,
  EACH_POSITIVE,
  KEPT,
  NON_NEGATIVE,
  ORIGINAL,
  POSITIVE,
  PROBABILITY,
  RECHOOSE,
  REFUSED,
  RESCORE,
  Check,
  Field,
)


DATA_NAME = Check(
  data_lib.known,
  'one of '
  + ', '.join(repr(n) for n in data_lib.names() if not n.endswith(':'))
  + ", or 'tfds:NAME' (NAME a tensorflow-datasets image-classification data set)",
)


def _is_json_object(text) -> bool:
  try:
    return isinstance(json.loads(text), dict)
  except (TypeError, ValueError):
    return False


FIELDS = (
  Field(
    'seed',
    0,
    'root of every key: init, training masks and shake-shake, search',
    check=Check(lambda v: 0 <= v < 2**63, 'a whole number in [0, 2**63)'),
  ),
  Field(
    'rng.impl',
    rng.DEFAULT,
    'the JAX PRNG implementation of every key the run derives from `seed` '
    '(`jax.random.key(seed, impl=...)`); the `philox` ones run on one device only (XLA '
    'cannot compile them on several); `rbg` and `unsafe_rbg` are refused: under `vmap` '
    'over keys they draw from the first key only ([sampling](sampling.md#generators))',
    choices=rng.IMPLEMENTATIONS,
    older_runs=rng.DEFAULT,
  ),
  # data
  Field(
    'data.name',
    'fashion_mnist',
    'data set (see [data sets](data.md)): `npz` reads your own arrays from `data.path`; '
    '`tfds:NAME` any tensorflow-datasets image-classification data set (e.g. '
    "`'tfds:mnist'`), read whole into memory; `cifar10`, `cifar100`, `imagenet2012` and "
    '`tfds:NAME` need the `tfds` extra',
    check=DATA_NAME,
  ),
  Field(
    'data.data_dir',
    '/usr/share/datasets/fashion-mnist',
    'Fashion-MNIST: folder of the IDX files; CIFAR, ImageNet and `tfds:NAME`: tfds '
    "`data_dir` holding `cifar10/`, `cifar100/`, `imagenet2012/` or `NAME/`, `''` (the "
    "CIFAR and ImageNet configs' value) for tfds' default, `$TFDS_DATA_DIR` or else "
    '`~/tensorflow_datasets`',
  ),
  Field(
    'data.path', '', '`npz` only: the `.npz` file holding `x_train`, `y_train`, `x_test`, `y_test`'
  ),
  Field(
    'data.num_classes',
    0,
    '`npz` only: the number of classes (labels are 0 .. num_classes - 1); 0: one more '
    'than the largest training label. The other data sets know theirs',
    check=NON_NEGATIVE,
  ),
  Field(
    'data.validation_size',
    5000,
    'images carved from the training split (a fixed permutation, the same for every '
    'seed) for ranking; never trained on (ImageNet configs: 50000)',
    check=Check(lambda v: v > 0, 'a positive number of images'),
  ),
  Field('data.random_flip', True, 'horizontal flip in training'),
  Field(
    'data.pad_crop',
    0,
    'pad by this many pixels and crop back at random in training; 0: off (must be 0 for ImageNet)',
    check=NON_NEGATIVE,
  ),
  Field(
    'data.cutout',
    0,
    'cutout in training (DeVries & Taylor 2017): per image one square of this side, '
    'centred uniformly over the image and clipped at the borders, set to 0 after '
    'normalisation (the training mean); 0: off (must be 0 for ImageNet)',
    check=NON_NEGATIVE,
  ),
  Field(
    'data.image_size',
    224,
    'ImageNet only (the others keep their native size): side of the square network '
    'input; training takes a random-resized crop (8% to 100% of the area, aspect 3/4 to '
    '4/3) resized to it, evaluation resizes the shorter side to `image_size * 256 / 224` '
    'and takes the centre crop',
    check=POSITIVE,
  ),
  # model
  Field(
    'model.family',
    'shake_shake',
    'super-network family (see [super-networks](supernets.md)); its fields are in '
    '`model.<family>`; `custom`: your own module (`model.custom`, see '
    '[library](library.md))',
    choices=supernets.names(),  # as registered when read: see fields()
  ),
  Field(
    'model.compute_dtype',
    'float32',
    '`bfloat16`: mixed precision for training and ranking; convolutions and activations '
    'in bf16, parameters, optimiser state, BatchNorm statistics, drop logits, masks and '
    'the loss in float32 (`pgnas_jax/precision.py`)',
    choices=('float32', 'bfloat16'),
  ),
  Field(
    'model.custom.module',
    '',
    "`model.family='custom'`: the Flax linen module class to search, "
    "`'package.module:ClassName'`, importable from the working directory; it is built as "
    "`ClassName(**kwargs)`, plus `num_classes` (the data set's) when the class declares "
    'that field and `kwargs` does not set it ([library](library.md))',
  ),
  Field(
    'model.custom.kwargs',
    '{}',
    "`model.family='custom'`: the class's keyword arguments as a JSON object, e.g. "
    '`--config.model.custom.kwargs=\'{"widths": [16, 32]}\'` (JSON lists become tuples)',
    check=Check(_is_json_object, 'a JSON object, e.g. \'{"widths": [16, 32]}\''),
  ),
  # drop probabilities
  Field(
    'drop.mode',
    'learned',
    '`learned`: PGNAS; `random`: every drop logit frozen at `random_p`, no entropy term, '
    "no gradient to the logits (the paper's predefined-dropout baseline)",
    choices=('learned', 'random'),
  ),
  Field('drop.init_p', 0.1, 'initial drop probability of every group', check=PROBABILITY),
  Field('drop.random_p', 0.1, 'p0 of the `random` ablation', check=PROBABILITY),
  Field(
    'drop.estimator',
    estimators.DEFAULT,
    'how the training masks are drawn and the drop logits get their gradient (SPEC '
    'section 2, "Gate estimators"): `concrete` the relaxed Bernoulli mask (the paper\'s Eq. '
    '16); `hard_concrete` it stretched to (-0.1, 1.1) and clipped, so exactly 0 or 1 with '
    'positive probability (Louizos et al. 2018); `straight_through` the hard Bernoulli mask '
    "forward, the concrete's gradient backward; `disarm` the hard mask, and an unbiased "
    'logit gradient from an antithetic pair of them (Dong et al. 2020; two forward passes '
    'per step). The KL terms use `p` and the search samples Bernoulli(`p`) with each',
    choices=estimators.NAMES,
    older_runs=estimators.DEFAULT,
  ),
  Field(
    'drop.tau',
    0.2,
    'temperature of the relaxed training masks (`concrete`, `hard_concrete`, the backward '
    "pass of `straight_through`; `disarm` has none); the first step's with `final_tau`",
    check=Check(lambda v: v > 0.0, '> 0'),
  ),
  Field(
    'drop.final_tau',
    0.0,
    '0: `tau` throughout; > 0: the temperature of the last training step, reached '
    'exponentially in the step, `tau * (final_tau / tau) ^ (t / (T - 1))` at step `t` of `T`',
    check=NON_NEGATIVE,
    older_runs=0.0,
  ),
  Field(
    'drop.logit_lr_multiplier',
    1.0,
    'learning-rate multiplier of the drop logits',
    check=NON_NEGATIVE,
  ),
  # objective
  Field(
    'objective.prior',
    'posterior',
    '`posterior`: prior term `l2 (1 - p) ||m||^2`; `constant`: `constant_l2 ||m||^2` '
    '(the "constant L2" ablation)',
    choices=('posterior', 'constant'),
  ),
  Field(
    'objective.weight_prior_l2',
    85.0,
    '`l2` of the weight prior (SPEC section 2); 85 makes the embedded default drop about a '
    "third of its parameters (README, the measured default run); the paper's setups use 0.1 "
    'to 2,500',
    check=NON_NEGATIVE,
  ),
  Field(
    'objective.constant_l2', 45.0, 'the constant of the `constant` ablation', check=NON_NEGATIVE
  ),
  Field(
    'objective.num_train_effective',
    55000.0,
    '`N` of SPEC section 2, the effective training-set size dividing the regulariser',
    check=POSITIVE,
  ),
  Field(
    'objective.weight_decay',
    0.0,
    'optional `0.5 * rate * ||w||^2` on non-searchable conv and dense kernels',
    check=NON_NEGATIVE,
  ),
  Field(
    'objective.auxiliary_weight',
    0.4,
    "weight of the auxiliary classifiers' cross-entropy in the training loss "
    '(SupNet-E/EI; ENAS uses 0.4)',
    check=NON_NEGATIVE,
  ),
  Field(
    'objective.target_params',
    0,
    "steer training to a size (SPEC section 7): the posterior's expected params are held "
    'at or under this, reached over the first `target_ramp` of training; the forms of '
    "`search.max_params` (a count, a share such as `0.5`, or `'50%'`); 0: none, the "
    "paper's objective. The search's `max_params` defaults to it",
    check=Check(budget.is_valid, budget.RULE),
    any_type=True,
    older_runs=0,
  ),
  Field(
    'objective.target_flops',
    0,
    'the same for FLOPs (MACs); with both, both are held',
    check=Check(budget.is_valid, budget.RULE),
    any_type=True,
    older_runs=0,
  ),
  Field(
    'objective.target_latency_ms',
    0,
    'the same for the predicted latency at `search.latency_batch_size` images (SPEC section 7, '
    '`pgnas_jax/latency_table.py`): milliseconds (e.g. `40.0`) or a share of the full '
    "network's measured latency as a string such as `'50%'`; refused below what the "
    "smallest candidate is predicted to take. The search's `max_latency_ms` defaults to it",
    check=Check(budget.is_valid_ms, budget.RULE_MS),
    any_type=True,
    older_runs=0,
  ),
  Field(
    'objective.target_ramp',
    0.5,
    "share of training over which the cost ceiling falls from the initial posterior's "
    'expected cost to the target',
    check=Check(lambda v: 0.0 <= v <= 1.0, 'in [0, 1]'),
    older_runs=0.5,
  ),
  # training
  Field('train.batch_size', 128, 'global batch, split over the devices', check=POSITIVE),
  Field('train.num_epochs', 5.0, 'training length in epochs', check=POSITIVE),
  Field('train.num_steps', -1, '> 0 overrides `num_epochs`'),
  Field('train.learning_rate', 0.1, 'peak learning rate', check=POSITIVE),
  Field(
    'train.init_from',
    '',
    'start from the weights of a super-network trained before (this network: the same '
    "`model.*`): an `.npz`, a `.msgpack` or an orbax checkpoint folder such as a workdir's "
    '`checkpoints/<step>` (`pgnas_jax/pretrained.py`); its drop logits are not taken. '
    "Checked against the model's shapes at start. '': from the initialisation",
    older_runs='',
  ),
  Field(
    'train.schedule',
    'cosine',
    '`cosine` (no restart, to 0), `step` (divide by `step_factor` at `step_epochs`), '
    '`sgdr` (warm restarts: `sgdr_t0_epochs`, `sgdr_t_mul`, down to `sgdr_min_lr`)',
    choices=('cosine', 'step', 'sgdr'),
  ),
  Field(
    'train.step_epochs',
    (30, 60, 90),
    'the `step` schedule: the epochs at which the learning rate is divided',
  ),
  Field('train.step_factor', 10.0, 'the `step` schedule: what it divides by', check=POSITIVE),
  Field('train.sgdr_min_lr', 1e-4, 'the `sgdr` schedule: the learning rate it ends a cycle at'),
  Field(
    'train.sgdr_t0_epochs', 10.0, "the `sgdr` schedule: the first cycle's epochs", check=POSITIVE
  ),
  Field(
    'train.sgdr_t_mul',
    2.0,
    "the `sgdr` schedule: each cycle's length over the last's",
    check=Check(lambda v: v >= 1.0, '>= 1'),
  ),
  Field(
    'train.momentum',
    0.9,
    'SGD momentum, weights and logits alike',
    check=Check(lambda v: 0.0 <= v < 1.0, 'in [0, 1)'),
  ),
  Field('train.nesterov', True, 'Nesterov momentum, weights and logits alike'),
  Field(
    'train.log_every_steps',
    50,
    'metrics line and progress every this many steps',
    check=POSITIVE,
    on_resume=KEPT,
  ),
  # checkpoints
  Field(
    'checkpoint.every_steps',
    500,
    'save the training state every this many steps (also at the end of training and on SIGTERM)',
    check=POSITIVE,
    on_resume=KEPT,
  ),
  Field('checkpoint.max_to_keep', 3, 'checkpoints kept', check=POSITIVE, on_resume=KEPT),
  # search
  Field(
    'search.num_candidates',
    100,
    "candidate architectures sampled and ranked (`sampler='mode'`: always 1)",
    check=POSITIVE,
  ),
  Field(
    'search.sampler',
    samplers.DEFAULT,
    'how candidate `c` is drawn from (search key, `c`) and the learned `p` '
    '([sampling](sampling.md#candidate-samplers)): `iid` independent masks; `antithetic` '
    'candidates `2k`, `2k+1` from `u` and `1 - u`; `stratified` Latin-hypercube per channel '
    'over blocks of `stratified_block` candidates; `mode` the one posterior mode (keep iff '
    '`p < 0.5`), so `num_candidates` counts as 1. A rerun with another sampler keeps the '
    'training and scores again',
    choices=samplers.NAMES,
    on_resume=RESCORE,
    older_runs=samplers.DEFAULT,
  ),
  Field(
    'search.stratified_block',
    16,
    "`sampler='stratified'`: candidates per block; each channel's uniforms in a block are "
    'its `stratified_block` strata in a random order, each jittered',
    check=Check(lambda v: type(v) is int and v >= 1, 'a whole number >= 1'),
    on_resume=RESCORE,
    older_runs=16,
  ),
  Field(
    'search.channel_multiple',
    'auto',
    "candidates keep or drop a group's input channels in aligned blocks of this many (the "
    'block takes the draw of its first channel), so every kept width of the compact '
    "network is a multiple of it; it must divide every group's width. `auto`: 1 without "
    "an `objective.target_*` (the paper's search); with one, the largest of 16, 8, 4, 2 "
    "dividing every group's width, so that the target's saving is realised (on a CPU a "
    'convolution below 16 channels costs nearly what a 16-channel one does, '
    '`docs/targets.md`). Training is unchanged; a rerun with another value scores again',
    check=AUTO_OR_COUNT,
    any_type=True,
    on_resume=RESCORE,
    older_runs=1,
  ),
  Field(
    'search.chunk_size',
    'auto',
    'candidates scored at once (`jax.vmap` over masks), split over the devices: a '
    'multiple of the device count, or `auto`: per device enough candidates for the '
    "platform's best images per call (CPU: 100, measured in `docs/benchmarks.md`; "
    'accelerators: 16,384), fewer if their activations would take more than half the '
    "device's free memory (`search.auto_chunk_size`)",
    check=AUTO_OR_COUNT,
    any_type=True,
  ),
  Field(
    'search.eval_batch_size',
    100,
    'validation and test batch (a multiple of the device count)',
    check=POSITIVE,
  ),
  Field(
    'search.max_params',
    0,
    'parameter budget: the winner is the best candidate with at most this many params; '
    '0: none; a whole number (e.g. `100000`, `1e5`), or a share of the full '
    "super-network's params: a float in (0, 1] (e.g. `0.5`) or a string such as "
    "`'50%'`. Every candidate is still scored and recorded (`fits` in "
    '`search/candidates.jsonl`); a rerun with another budget reuses them',
    check=Check(budget.is_valid, budget.RULE),
    any_type=True,
    on_resume=RECHOOSE,
    older_runs=0,
  ),
  Field(
    'search.max_flops',
    0,
    'FLOPs (MACs) budget, in the forms of `max_params`; with both, a candidate must fit both',
    check=Check(budget.is_valid, budget.RULE),
    any_type=True,
    on_resume=RECHOOSE,
    older_runs=0,
  ),
  Field(
    'search.max_latency_ms',
    0,
    'latency budget: the winner is the best candidate whose predicted latency '
    '(`latency_ms` in `search/candidates.jsonl`, from the per-layer table of '
    '`pgnas_jax/latency_table.py`) is at most this; milliseconds or a string such as '
    "`'50%'` of the full network's measured latency; 0: none",
    check=Check(budget.is_valid_ms, budget.RULE_MS),
    any_type=True,
    on_resume=RECHOOSE,
    older_runs=0,
  ),
  Field(
    'search.predict_latency',
    False,
    "record every candidate's predicted latency (`latency_ms`), its accuracy-latency "
    'Pareto front and, with `export.latency`, predicted against measured latency on '
    'the front; on whenever a latency budget or target is set. Latency is measured on '
    'this machine: a run that uses it reproduces bit for bit only where its table '
    '(`search/latency_table.json`) was made',
    check=Check(lambda v: type(v) is bool, 'True or False'),
    on_resume=RECHOOSE,
    older_runs=False,
  ),
  Field(
    'search.latency_batch_size',
    128,
    'images per call at which latency is measured and predicted',
    check=POSITIVE,
    older_runs=128,
  ),
  Field(
    'search.bn_recalibration_batches',
    0,
    'before a candidate is scored, re-estimate its BatchNorm statistics on this many '
    'training batches of `eval_batch_size` un-augmented images (the first of the '
    'training split, the same for every candidate): the mean of the per-batch means and '
    'variances, each layer normalising with its batch statistics as in training; 0: '
    "off, the trained super-network's running statistics (SPEC section 3)",
    check=Check(lambda v: type(v) is int and v >= 0, 'a whole number >= 0'),
  ),
  # fine-tuning of the winner, after the choice (SPEC section 3)
  Field(
    'finetune.steps',
    0,
    'after the choice, fine-tune the winner this many steps and report it beside the '
    'un-tuned one (`arch.json` `finetuned`, `report.md`, '
    "`search/winner_finetuned_weights.msgpack`); 0: off, the paper's headline protocol. "
    "The winner's mask stays fixed; the loss is the training objective over the "
    "architecture's own weights (cross-entropy + weight prior, logits frozen); BatchNorm "
    'statistics are updated; batches continue the training sequence '
    '(`pgnas_jax/finetune.py`)',
    check=Check(lambda v: v >= 0, '>= 0 (0: no fine-tuning)'),
  ),
  Field(
    'finetune.learning_rate',
    0.01,
    'peak learning rate of the fine-tuning, cosine to 0; SGD with `train.momentum` and '
    '`train.nesterov`',
    check=POSITIVE,
  ),
  # the deployable winner (docs/export.md)
  Field(
    'export.latency',
    True,
    "measure the compact winner's, the masked and the full super-network's latency at "
    'batch 1 and 128 (the three timed in turn, medians of 20 calls after warm-up) into '
    '`arch.json` `latency_ms` and '
    '`report.md`; False: skip it (a timing, not a result: the only field of the workdir '
    'that differs between two runs of one config)',
    check=Check(lambda v: type(v) is bool, 'True or False'),
    on_resume=KEPT,
  ),
  # what a run shows besides its results (docs/observability.md)
  Field(
    'log.tensorboard',
    True,
    'write TensorBoard event files to `WORKDIR/tensorboard/` when `tensorboardX` is '
    'installed (the `tensorboard` extra); without it the run is unchanged and the log '
    'says how to get them; False: never',
    check=Check(lambda v: type(v) is bool, 'True or False'),
    on_resume=KEPT,
  ),
  Field(
    'log.profile_steps',
    (),
    "training steps (counted from 1, as `metrics.jsonl`'s `step`) to trace with "
    "`jax.profiler` into `WORKDIR/profile/`, e.g. `--config.log.profile_steps='(101,102)'`"
    '; empty: no tracing',
    check=Check(
      lambda v: all(type(s) is int and s >= 1 for s in v),
      'a tuple of training steps, each a whole number >= 1, e.g. (11, 12)',
    ),
    on_resume=KEPT,
  ),
)

FAMILY_FIELDS_AFTER = 'model.compute_dtype'  # the families' sections follow this field


def as_run(saved: dict) -> dict:
  """A saved config (a run's config.json), flat (``'train.batch_size': 128``), with each
  field added since the run was made set to the value a run without it had
  (``Field.older_runs``)."""
  older = {f.name: f.older_runs for f in fields() if f.older_runs is not ORIGINAL}
  return {**older, **traverse_util.flatten_dict(saved, sep='.')}


def fields() -> tuple:
  """Every field: ``FIELDS`` with each registered family's own (``supernets.FAMILIES``,
  ``model.<family>.*``) after ``FAMILY_FIELDS_AFTER``, and ``model.family`` choosing among
  the families registered now."""
  families = tuple(
    dataclasses.replace(f, name=f'model.{name}.{f.name}')
    for name, family in supernets.FAMILIES.items()
    for f in family.fields
  )
  at = 1 + next(i for i, f in enumerate(FIELDS) if f.name == FAMILY_FIELDS_AFTER)
  every = FIELDS[:at] + families + FIELDS[at:]
  return tuple(
    dataclasses.replace(f, choices=supernets.names()) if f.name == 'model.family' else f
    for f in every
  )


def constraints() -> tuple:
  """``CONSTRAINTS`` and each registered family's checks across its fields."""
  return CONSTRAINTS + tuple(
    (tuple(f'model.{name}.{k}' for k in keys), test, what)
    for name, family in supernets.FAMILIES.items()
    for keys, test, what in family.constraints
  )


# checks across fields: (fields, test of their values, what must hold)
CONSTRAINTS = (
  (
    ('data.name', 'data.pad_crop', 'data.cutout'),
    lambda name, pad_crop, cutout: name != 'imagenet2012' or pad_crop == cutout == 0,
    (
      'imagenet2012 is augmented by random-resized crop and flip only: set pad_crop and cutout to 0'
    ),
  ),
  (
    ('data.name', 'data.path'),
    lambda name, path: (name == 'npz') == bool(path),
    "data.name='npz' reads the file data.path, which must be set then and only then",
  ),
  (
    ('data.name', 'data.num_classes'),
    lambda name, classes: name == 'npz' or classes == 0,
    ("data.num_classes is for data.name='npz' only (the other data sets know theirs): leave it 0"),
  ),
  (
    ('model.family', 'model.custom.module', 'model.custom.kwargs'),
    lambda family, module, kwargs: family == 'custom' or (module, kwargs) == ('', '{}'),
    (
      "model.custom.* names the module of model.family='custom' only: set "
      '--config.model.family=custom to search it, or leave model.custom.module and kwargs '
      'unset'
    ),
  ),
  (
    ('model.family', 'model.custom.module'),
    lambda family, module: family != 'custom' or bool(module),
    (
      "model.family='custom' needs its class: set --config.model.custom.module="
      "'package.module:ClassName'"
    ),
  ),
)


# fields split evenly over the devices of all processes together ('auto' chunks choose so)
SPLIT_OVER_DEVICES = ('train.batch_size', 'search.eval_batch_size', 'search.chunk_size')


def get_config() -> ml_collections.ConfigDict:
  """The embedded default: every field (``fields()``) at its default."""
  c = ml_collections.ConfigDict()
  for field in fields():
    *parents, leaf = field.name.split('.')
    node = c
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = (
      ml_collections.FieldReference(field.default, field_type=object)
      if field.any_type
      else field.default
    )
  return c


def read_config_file(path: str) -> types.ModuleType:
  """A config file (``configs/*.py``) as a module: its docstring says how to run it and what
  the paper reports, its ``get_config()`` builds the config, as ``--config=PATH`` does."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_sibling(config_file: str, name: str) -> types.ModuleType:
  """The config file ``name``.py in the folder of ``config_file`` (a config passes its
  ``__file__``): configs/ is not a package, so a config builds on another by its path, which
  works however the config itself was loaded (``--config=PATH`` or read_config_file)."""
  return read_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py'))


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def set_fields(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """``config`` with ``overrides`` (dotted field -> value) set, as ``--config.`` flags set
  them."""
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and the fix."""
  reference = get_config()
  ref_keys = set(_flat_keys(reference))
  for key in _flat_keys(config):
    if key not in ref_keys:
      raise ConfigError(
        f'unknown config field {key!r}: remove it or check its spelling '
        f'(fields are listed in README.md, "Config fields")'
      )
  for key in ref_keys - set(_flat_keys(config)):
    raise ConfigError(
      f'config field {key!r} is missing: start config files from '
      f'pgnas_jax.config.get_config() and override fields'
    )
  if config.rng.impl in rng.REFUSED:  # why, rather than only the list of choices
    raise ConfigError(
      f'--config.rng.impl={config.rng.impl!r} is not offered: {rng.REFUSED[config.rng.impl]}'
    )
  # every choice before any range, as the message for a config with several faults says
  every = fields()
  for field in every:
    if field.choices and _get(config, field.name) not in field.choices:
      raise ConfigError(
        f'--config.{field.name}={_get(config, field.name)!r} is not one of {field.choices}'
      )
  for field in every:
    if field.check and not field.check.test(_get(config, field.name)):
      raise ConfigError(
        f'--config.{field.name}={_get(config, field.name)!r} is out of range: '
        f'it must be {field.check.what}'
      )
  for keys, ok, what in constraints():
    if not ok(*(_get(config, k) for k in keys)):
      values = ', '.join(f'--config.{k}={_get(config, k)!r}' for k in keys)
      raise ConfigError(f'{values} do not fit together: {what}')


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Global batches and chunks of candidates are split evenly over the devices; some
  generators run on one device only."""
  if num_devices > 1 and config.rng.impl in rng.ONE_DEVICE_ONLY:
    raise ConfigError(
      f'--config.rng.impl={config.rng.impl!r} does not run on {num_devices} devices: '
      f'{rng.ONE_DEVICE_ONLY[config.rng.impl]}'
    )
  for key in SPLIT_OVER_DEVICES:
    if _get(config, key) != 'auto' and _get(config, key) % num_devices:
      raise ConfigError(
        f'--config.{key}={_get(config, key)} does not split over {num_devices} '
        f'devices: use a multiple of {num_devices}'
      )


def _flat_keys(config, prefix=''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'
