"""The config files and the field table they start from."""

import dataclasses
import os

import pytest
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from pgnas_jax import config as config_lib
from pgnas_jax import config_doc, errors, resume
from pgnas_jax import workdir as workdir_lib

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')
NAMES = sorted(n[:-3] for n in os.listdir(CONFIGS) if n.endswith('.py') and n != 'common.py')


def _flat(config) -> dict:
  return traverse_util.flatten_dict(config.to_dict(), sep='.')


def _load(name):
  return config_lib.read_config_file(os.path.join(CONFIGS, f'{name}.py')).get_config()


# each derived config file against its base: the overrides its docstring and README name
@pytest.mark.parametrize(
  'name, base, overrides',
  [
    ('cifar10_ei', 'cifar10_e', {'model.enas.filters': 72}),
    (
      'cifar10_mi',
      'cifar10_m',
      {'model.shake_shake.widths': (160, 320, 640), 'objective.weight_prior_l2': 150.0},
    ),
    (
      'cifar100_mi',
      'cifar10_m',
      {
        'data.name': 'cifar100',
        'model.shake_shake.widths': (160, 320, 640),
        'objective.weight_prior_l2': 2500.0,
        'search.num_candidates': 5000,
      },
    ),
    (
      'imagenet_d121',
      'imagenet_r50',
      {
        'model.family': 'densenet',
        'objective.weight_prior_l2': 100.0,
        'train.batch_size': 300,
        'train.num_epochs': 180.0,
        'train.step_epochs': (90, 140, 160),
      },
    ),
  ],
)
def test_a_derived_config_is_its_base_and_its_overrides(name, base, overrides):
  derived, original = _flat(_load(name)), _flat(_load(base))
  changed = {k: v for k, v in derived.items() if v != original[k]}
  assert changed == overrides


@pytest.mark.parametrize('name', NAMES)
def test_a_config_file_loads_as_the_command_line_loads_it(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a sibling is found from the config's own path, not the cwd
  path = os.path.abspath(os.path.join(CONFIGS, f'{name}.py'))
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values)
  flag_values(['prog', f'--config={path}'])
  assert flag_values.config.to_dict() == _load(name).to_dict()


def test_field_names_are_unique():
  names = [field.name for field in config_lib.fields()]
  assert len(names) == len(set(names))


def test_a_field_is_one_entry(monkeypatch):
  """A new Field reaches get_config(), validate() and docs/config.md without anything else."""
  field = config_lib.Field(
    'train.profile_steps', 0, 'trace this many steps; 0: off', check=config_lib.NON_NEGATIVE
  )
  monkeypatch.setattr(config_lib, 'FIELDS', config_lib.FIELDS + (field,))
  c = config_lib.get_config()
  assert c.train.profile_steps == 0
  config_lib.validate(c)
  c.train.profile_steps = -1
  with pytest.raises(
    errors.ConfigError,
    match=r'train\.profile_steps=-1 is out of range: it '
    r'must be >= 0',
  ):
    config_lib.validate(c)
  assert (
    '| `train.profile_steps` | `0` | >= 0 | trace this many steps; 0: off |' in config_doc.render()
  )


def test_a_field_with_choices_refuses_others(monkeypatch):
  field = dataclasses.replace(
    config_lib.FIELDS[0], name='train.writer', default='jsonl', choices=('jsonl', 'tensorboard')
  )
  monkeypatch.setattr(config_lib, 'FIELDS', config_lib.FIELDS + (field,))
  c = config_lib.get_config()
  c.train.writer = 'csv'
  with pytest.raises(errors.ConfigError, match=r"train\.writer='csv' is not one of"):
    config_lib.validate(c)


def _saved_run(tmp_path, config, drop=()):
  """A workdir whose config.json is ``config`` without the dotted fields ``drop``."""
  saved = _flat(config)
  for name in drop:
    del saved[name]
  workdir_lib.write_json(
    str(tmp_path / 'config.json'), traverse_util.unflatten_dict(saved, sep='.')
  )
  return str(tmp_path)


def test_fields_declare_how_they_resume(tmp_path):
  """Each field says what resuming with another value does: a KEPT, RECHOOSE or RESCORE
  field may change, any other is refused by name; a run saved before a field existed resumes
  as its ``older_runs``, and is refused when the field now has another value."""
  kinds = {config_lib.REFUSED, config_lib.KEPT, config_lib.RECHOOSE, config_lib.RESCORE}
  assert {f.on_resume for f in config_lib.fields()} == kinds
  config = config_lib.get_config()
  workdir = _saved_run(tmp_path, config)
  for field in config_lib.fields():
    changed = _with_another_value(field)
    if field.on_resume == config_lib.REFUSED:
      with pytest.raises(errors.IncompatibleWorkdirError, match=field.name):
        resume.check_resumable(workdir, changed)
    else:
      resume.check_resumable(workdir, changed)
  added = [f for f in config_lib.fields() if f.older_runs is not config_lib.ORIGINAL]
  assert {f.name for f in added} >= {'rng.impl', 'drop.estimator', 'search.sampler'}
  older = tmp_path / 'older'
  older.mkdir()
  workdir = _saved_run(older, config, drop=[f.name for f in added])
  # so the default config resumes it as it ran (channel_multiple's 'auto' is 1 untargeted)
  assert all(f.older_runs == f.default for f in added if f.name != 'search.channel_multiple')
  resume.check_resumable(workdir, config)
  assert not resume.sampler_changed(workdir, config)
  for field in (f for f in added if f.on_resume == config_lib.REFUSED):
    changed = _with_another_value(field)
    with pytest.raises(
      errors.IncompatibleWorkdirError, match=f'{field.name}: {field.older_runs!r}'
    ):
      resume.check_resumable(workdir, changed)


def _with_another_value(field):
  """The default config with ``field`` at another of its valid values."""
  config = config_lib.get_config()
  *sections, key = field.name.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[key] = _another_value(field)
  return config


def _another_value(field):
  """A valid value of ``field`` other than its default."""
  if field.choices:
    return next(c for c in field.choices if c != field.default)
  default = field.default
  if type(default) is bool:
    return not default
  if type(default) in (int, float):
    return default + 1 if field.check is None or field.check.test(default + 1) else default / 2
  if type(default) is tuple:
    return (*default, 1) if field.check is None or field.check.test((*default, 1)) else ()
  return default + '_other'
