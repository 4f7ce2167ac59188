"""Weights a run starts from (``train.init_from``): a super-network trained before, by this
project or elsewhere, read from an ``.npz``, a ``.msgpack`` (flax serialisation) or an orbax
checkpoint, and checked against the model's parameters before the workdir is touched.

What a file may hold: the model's parameters alone, or flax variables (``params`` and
optionally ``batch_stats``), or a pgnas_jax training state (a workdir's
``checkpoints/<step>``: its weights and BatchNorm statistics; its drop logits are not taken,
the new run learns its own). In an ``.npz`` nested names are joined by ``/``
(``params/stem/kernel``, or ``stem/kernel`` for parameters alone).
"""

import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from pgnas_jax.errors import ConfigError

PyTree = Any
FORMATS = '.npz, .msgpack (flax serialisation) or an orbax checkpoint folder'


def load(path: str, expected: dict) -> dict:
  """The variables (``params``, and ``batch_stats`` where ``expected`` has them and the file
  holds them) of the file at ``path``, as NumPy arrays; ``ConfigError`` in one line if it
  cannot be read or does not fit ``expected`` (the model's variables, or their shapes)."""
  tree = _variables(_read(path))
  found = {'params': tree['params']}
  if 'batch_stats' in expected and tree.get('batch_stats'):
    found['batch_stats'] = tree['batch_stats']
  for collection, values in found.items():
    _check_fits(path, collection, values, expected[collection])
  return jax.tree.map(lambda v, e: np.asarray(v, e.dtype), found, {k: expected[k] for k in found})


def _read(path: str) -> dict:
  flag = f'--config.train.init_from={path}'
  if not os.path.exists(path):
    raise ConfigError(f'{flag}: no such file or folder; give a {FORMATS}')
  try:
    if os.path.isdir(path):
      inner = os.path.join(path, 'default')  # a workdir's checkpoints/<step>
      folder = inner if os.path.isdir(inner) else path
      return ocp.StandardCheckpointer().restore(os.path.abspath(folder))
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as arrays:
        return flax.traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep='/')
    if path.endswith('.msgpack'):
      with open(path, 'rb') as f:
        return flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # numpy, msgpack and orbax raise many types for a damaged file
    raise ConfigError(
      f'{flag} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); give a '
      f'{FORMATS}'
    ) from None
  raise ConfigError(f'{flag} is neither a {FORMATS}')


def _variables(tree: dict) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` of whichever layout the file has."""
  if not isinstance(tree, dict):
    return {'params': tree}
  params = tree.get('params')
  if isinstance(params, dict) and 'weights' in params:  # a pgnas_jax training state
    return {'params': params['weights'], 'batch_stats': tree.get('batch_stats') or {}}
  if isinstance(params, dict):
    return tree
  return {'params': tree}


def _check_fits(path: str, collection: str, found: PyTree, expected: PyTree) -> None:
  def shapes(tree):  # arrays or, for the model's side, their shapes (jax.eval_shape)
    flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {}
    return {k: tuple(getattr(v, 'shape', np.shape(v))) for k, v in flat.items()}

  have, want = shapes(found), shapes(expected)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if have[k] != want[k])
  flag = f'--config.train.init_from={path}'
  if not (missing or extra or wrong):
    return
  if wrong:
    k = wrong[0]
    detail = f'{collection}/{k} is {_shape(have[k])} there, {_shape(want[k])} in this network'
  elif missing:
    detail = f'it has no {collection}/{missing[0]}'
  else:
    detail = f'this network has no {collection}/{extra[0]}'
  problems = len(missing) + len(extra) + len(wrong)
  raise ConfigError(
    f'{flag} holds another network: {detail} ({problems} of {len(want)} arrays differ); '
    f'give weights of this super-network (model.* as in this config)'
  )


def _shape(shape: tuple) -> str:
  return 'x'.join(str(n) for n in shape) or 'a scalar'
