"""A Flax NNX network as the Linen module the pipeline runs: ``pgnas_jax.from_nnx(Class,
**kwargs)``.

The pipeline creates a network's weights from the run's seed, records it in config.json as a
class and keyword arguments, and calls ``model.init`` / ``model.apply(variables, images,
train=...)`` with the collections of ``layers``. ``FromNNX`` holds an NNX class and its
keyword arguments and gives it that interface:
  * ``init`` builds ``Class(**kwargs, rngs=nnx.Rngs(<the run's params key>))``, calls it once
    (a searchable layer learns its costs from the shapes it sees) and files every variable
    under its collection (``nnx_layers.COLLECTIONS``; ``nnx.Param``: params,
    ``nnx.BatchStat``: batch_stats) at its path, with the group containers of the searchable
    layers folded away so that the paths are the Linen layers' ones;
  * ``apply`` builds the network's shapes only (``nnx.eval_shape``: no weights are drawn),
    fills them from the variables given (a searchable layer's masks and kept inputs not given:
    the super-network's, all ones and every input), calls it, and files what it changed in
    the collections the caller made mutable; a change elsewhere (BatchNorm statistics with
    ``train=False``) is an error, as Linen's.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.nnx import variablelib

from pgnas_jax import nnx_layers

# what a searchable layer's variable is when the caller does not pass its collection
_DEFAULTS = {
  nnx_layers.Masks: lambda a: jnp.ones(a.shape, a.dtype),
  nnx_layers.Kept: lambda a: jnp.arange(a.shape[0], dtype=a.dtype),
  nnx_layers.ChannelCosts: lambda a: jnp.zeros(a.shape, a.dtype),
  nnx_layers.FixedMacs: lambda a: jnp.zeros(a.shape, a.dtype),
}


def is_nnx_class(cls) -> bool:
  return isinstance(cls, type) and issubclass(cls, nnx.Module)


def from_nnx(nnx_class: type, **kwargs) -> 'FromNNX':
  """The NNX network ``nnx_class(**kwargs, rngs=...)`` as a module the pipeline searches
  (``search_network``): its weights are drawn from the run's seed."""
  if not is_nnx_class(nnx_class):
    raise TypeError(f'from_nnx takes a flax.nnx.Module class, not {nnx_class!r}')
  return FromNNX(nnx_class, tuple(sorted((k, as_tuples(v)) for k, v in kwargs.items())))


def as_tuples(value):
  """``value`` with its lists as tuples, at any depth (JSON gives lists): a module's fields
  must be hashable, the module is a key of compiled-function caches."""
  if isinstance(value, list | tuple):
    return tuple(as_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: as_tuples(v) for k, v in value.items()}
  return value


def _linen_place(path: tuple, variable) -> tuple:
  """(collection, path) where a Linen network holds the NNX ``variable`` at ``path``."""
  collection = variablelib.variable_name_from_type(type(variable), allow_register=True)
  path = tuple(str(p) for p in path)
  if isinstance(variable, nnx_layers.GROUP_KINDS):  # <layer>/<container>/group<i>
    path = path[:-2] + path[-1:]
  return collection, path


@dataclasses.dataclass(frozen=True)
class _Given:
  """The variables a Linen ``apply`` was given, by collection and flattened path."""

  flat: dict

  @classmethod
  def of(cls, variables) -> '_Given':
    return cls({c: traverse_util.flatten_dict(dict(v)) for c, v in variables.items()})

  def value(self, path: tuple, variable):
    collection, where = _linen_place(path, variable)
    found = self.flat.get(collection, {}).get(where)
    if found is not None:
      return found
    if type(variable) in _DEFAULTS:
      return _DEFAULTS[type(variable)](variable.get_value())
    raise ValueError(f'{collection}/{"/".join(where)} is not among the variables given')


class FromNNX(nn.Module):
  """``nnx_class(**dict(kwargs))`` run as a Linen module (see the module docstring)."""

  nnx_class: type
  kwargs: tuple = ()  # (name, value) pairs, sorted by name; values hashable

  def _build(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.nnx_class(**dict(self.kwargs), rngs=rngs)

  def _file(self, net: nnx.Module, collections=None) -> None:
    """Puts ``net``'s variables (of ``collections``; None: all but kept inputs) in place."""
    trees = {}
    for path, variable in nnx.to_flat_state(nnx.state(net, nnx.Not(nnx.RngState))):
      collection, where = _linen_place(path, variable)
      if collections is None and isinstance(variable, nnx_layers.Kept):
        continue  # a pruned network's collection: absent from the super-network's variables
      if collections is None or collection in collections:
        trees.setdefault(collection, {})[where] = variable.get_value()
    for collection, flat in trees.items():
      for name, tree in traverse_util.unflatten_dict(flat).items():
        self.put_variable(collection, name, tree)

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.is_initializing():
      net = self._build(nnx.Rngs(self.make_rng('params')))
      logits = net(images, train=train)
      self._file(net)
      return logits
    net = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
    given = _Given.of(self.variables)
    graph, abstract = nnx.split(net)
    state = nnx.from_flat_state(
      [(p, v.replace(given.value(p, v))) for p, v in nnx.to_flat_state(abstract)]
    )
    net = nnx.merge(graph, state)
    before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(net, nnx.BatchStat))}
    logits = net(images, train=train)
    after = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(net, nnx.BatchStat))}
    changed = [p for p in after if after[p] is not before[p]]
    if changed and not self.is_mutable_collection('batch_stats'):
      raise ValueError(
        f'{self.nnx_class.__name__} changed batch_stats/{"/".join(map(str, changed[0]))} in '
        f'a call that may not change them (train={train})'
      )
    if changed:
      self._file(net, ('batch_stats',))
    return logits
