"""Super-networks by family, in a registry. A family is one unit: its module (a flax.linen
module ``model.apply(variables, images, train=...)`` whose searchable convs read masks
from the ``masks`` collection), its config fields (``model.<family>.*``, each a field of the
module of the same name, so the model is built from its own config section by keyword)
and checks across them. The config, ``build`` and ``docs/config.md`` read ``FAMILIES``;
the compact export needs nothing of a family (``compact/derived.py`` follows any
network's channels); adding a family is its own file and one ``register`` line.
``custom`` is the user's own module (``supernets/custom.py``), built from a class path
instead."""

import dataclasses

import ml_collections

from pgnas_jax.supernets import custom, densenet, enas, resnet, shake_shake
from pgnas_jax.supernets.densenet import SearchableDenseNet
from pgnas_jax.supernets.enas import EnasNet
from pgnas_jax.supernets.resnet import MultiKernelResNet
from pgnas_jax.supernets.shake_shake import ShakeShakeNet

CUSTOM = 'custom'


@dataclasses.dataclass(frozen=True)
class Family:
  module: type  # the flax.linen module, built as module(num_classes=..., **its fields)
  fields: tuple  # schema.Field, named as the module's fields, under model.<family>
  constraints: tuple = ()  # (field names, test of their values, what must hold)


FAMILIES: dict = {}


def register(name: str, family: Family) -> None:
  """Makes ``model.family=name`` build ``family`` (its fields: ``model.<name>.*``)."""
  if name == CUSTOM or not name.isidentifier():
    raise ValueError(f'a family cannot be named {name!r}')
  FAMILIES[name] = family


register('shake_shake', Family(ShakeShakeNet, shake_shake.FIELDS))
register('enas', Family(EnasNet, enas.FIELDS))
register('resnet', Family(MultiKernelResNet, resnet.FIELDS, resnet.CONSTRAINTS))
register('densenet', Family(SearchableDenseNet, densenet.FIELDS))


def names() -> tuple:
  """Every value of ``model.family``: the registered families, then ``custom``."""
  return (*FAMILIES, CUSTOM)


def _value(v):
  return tuple(v) if isinstance(v, list | tuple) else v


def build(model_config: ml_collections.ConfigDict, num_classes: int):
  """The super-network ``model_config.family`` names, from its section of the config."""
  name = model_config.family
  if name == CUSTOM:
    return custom.build(model_config.custom, num_classes)
  if name not in FAMILIES:
    raise ValueError(f'unknown model.family {name!r}; choose one of {names()}')
  family, section = FAMILIES[name], model_config[name]
  kwargs = {f.name: _value(section[f.name]) for f in family.fields}
  return family.module(num_classes=num_classes, **kwargs)


def family_of(model) -> Family | None:
  """The registered family ``model`` is an instance of; None for a custom module."""
  return next((f for f in FAMILIES.values() if isinstance(model, f.module)), None)
