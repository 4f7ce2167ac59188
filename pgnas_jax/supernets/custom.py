"""Your own super-network: any Flax linen module with at least one ``SearchableConv`` or
``SearchableDense``, or an NNX one with their ``pgnas_jax.nnx`` versions (run as a linen
module by ``nnx_bridge.FromNNX``).

``model.family='custom'`` names the class (``model.custom.module``, 'package.module:Class')
and its keyword arguments (``model.custom.kwargs``, a JSON object: a string survives
ml_collections' command-line overrides and config.json round-trips, where a dict of free keys
would be refused as unknown fields). ``check`` runs once at start, before the workdir is
touched, and answers a module the pipeline cannot use with one line (docs/library.md says
what a module must satisfy):
  * ``__call__(self, images, train: bool)``; with ``train=False`` it changes no variable
    (BatchNorm reads its running statistics), with ``train=True`` it may update
    ``batch_stats`` (and sow ``auxiliary_logits``); it returns logits ``[batch, classes]``;
  * at least one ``SearchableConv`` or ``SearchableDense``: they declare the search space;
  * every other conv or dense kernel in a ``pgnas_jax.Conv`` or ``pgnas_jax.Dense``, which
    record the MACs the cost model adds up (BatchNorm, pooling and activations are not
    counted, as for the four families).
"""

import dataclasses
import hashlib
import importlib
import inspect
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from pgnas_jax import layers
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.errors import ConfigError, IncompatibleWorkdirError
from pgnas_jax.supernets import nnx_bridge

MODULE_FIELD = '--config.model.custom.module'
KWARGS_FIELD = '--config.model.custom.kwargs'


def load_class(spec: str) -> type:
  """The class ``spec`` ('package.module:ClassName') names."""
  module_name, _, class_name = spec.partition(':')
  if not module_name or not class_name:
    raise ConfigError(f"{MODULE_FIELD}={spec!r} is not 'package.module:ClassName'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(
      f'{MODULE_FIELD}={spec!r} cannot be imported ({e}): run from the folder '
      f'holding {module_name.split(".")[0]} or install it'
    ) from None
  except Exception as e:  # noqa: BLE001  (the user's code: any error is answered in one line)
    raise ConfigError(
      f'{MODULE_FIELD}={spec!r}: importing {module_name} fails with {_one_line(e)}; fix the module'
    ) from None
  cls = getattr(module, class_name, None)
  if not (isinstance(cls, type) and issubclass(cls, nn.Module) or nnx_bridge.is_nnx_class(cls)):
    raise ConfigError(
      f'{MODULE_FIELD}={spec!r}: {module_name} has no flax.linen.Module or flax.nnx.Module '
      f'class {class_name!r}; name the class that defines your network'
    )
  return cls


def _one_line(e: Exception) -> str:
  """``Type: text`` of an exception the user's code raised, on one line, with the file and
  line of a SyntaxError."""
  where = f' ({e.filename}, line {e.lineno})' if isinstance(e, SyntaxError) else ''
  return f'{type(e).__name__}: {" ".join(str(e).split())[:300]}{where}'


def _network_class(model: nn.Module) -> type:
  """The class the user wrote: ``model``'s, or the NNX class it runs."""
  return model.nnx_class if isinstance(model, nnx_bridge.FromNNX) else type(model)


def source(model: nn.Module) -> dict | None:
  """The class of ``model``, the file that defines it and that file's SHA-256: a run of a
  custom module is a run of this code (None where the class has no source file)."""
  cls = _network_class(model)
  try:
    path = inspect.getsourcefile(cls)
    with open(path, 'rb') as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  except (TypeError, OSError):
    return None
  return {'module': f'{cls.__module__}:{cls.__qualname__}', 'file': path, 'sha256': digest}


def check_source(workdir: str, source: dict | None) -> None:
  """A run of a custom module resumes only with the source it began with
  (``source``): one search ranks one network. A run begun before the source was
  recorded resumes as it is."""
  path = workdir_lib.path(workdir, workdir_lib.MODULE_SOURCE)
  if source is None or not os.path.exists(path):
    return
  try:
    saved = workdir_lib.read_json(path)
  except ValueError:
    saved = {}
  if saved.get('sha256') != source['sha256']:
    raise IncompatibleWorkdirError(
      f'--workdir={workdir} holds a run of {source["module"]} whose source has changed since '
      f'it began ({source["file"]}: sha256 {str(saved.get("sha256"))[:12]} then, '
      f'{source["sha256"][:12]} now); nothing was changed. Restore that code to resume it, '
      f'choose a new --workdir, or add --start_over to delete its outputs and start again'
    )


def _takes_num_classes(cls: type) -> bool:
  if nnx_bridge.is_nnx_class(cls):
    return 'num_classes' in inspect.signature(cls.__init__).parameters
  return any(f.name == 'num_classes' for f in dataclasses.fields(cls))


def _construct(cls: type, kwargs: dict) -> nn.Module:
  """``cls(**kwargs)``; an NNX class as ``from_nnx(cls, **kwargs)``, its arguments checked
  against its ``__init__`` (it is built at init, with the run's random key)."""
  if not nnx_bridge.is_nnx_class(cls):
    return cls(**kwargs)
  inspect.signature(cls.__init__).bind(None, **kwargs, rngs=None)
  return nnx_bridge.from_nnx(cls, **kwargs)


def build(custom: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """``Class(**kwargs)``, with ``num_classes`` when the class has that field (argument)
  and ``kwargs`` does not set it."""
  cls = load_class(custom.module)
  kwargs = nnx_bridge.as_tuples(json.loads(custom.kwargs))
  if _takes_num_classes(cls):
    kwargs.setdefault('num_classes', num_classes)
  try:
    return _construct(cls, kwargs)
  except TypeError as e:
    raise ConfigError(
      f'{KWARGS_FIELD}={custom.kwargs!r} is refused by {custom.module}: {e}; '
      f'give only fields the class declares'
    ) from None
  except Exception as e:  # noqa: BLE001  (the user's code)
    raise ConfigError(
      f'{custom.module}({custom.kwargs}) fails with {_one_line(e)}; fix the module or '
      f'{KWARGS_FIELD}'
    ) from None


def _given_fields(model: nn.Module) -> dict:
  """The fields of a linen ``model`` that differ from their defaults; an NNX network's
  arguments as ``from_nnx`` was given them."""
  if isinstance(model, nnx_bridge.FromNNX):
    return dict(model.kwargs)
  out = {}
  for f in dataclasses.fields(type(model)):
    if not f.init or f.name in ('parent', 'name'):
      continue
    value = getattr(model, f.name)
    if f.default is dataclasses.MISSING or value != f.default:
      out[f.name] = value
  return out


def describe(model: nn.Module, num_classes: int) -> tuple:
  """(module, kwargs) config values that ``build`` turns back into ``model``: its class and
  the fields that differ from their defaults (``num_classes`` only where it is not the
  data set's)."""
  if isinstance(model, nnx.Module):
    raise ConfigError(
      f'search_network takes an NNX network as pgnas_jax.from_nnx({type(model).__name__}, '
      f'**kwargs), not an instance: the run draws its weights from its seed and config.json '
      f'records the class and its arguments'
    )
  cls = _network_class(model)
  kwargs = _given_fields(model)
  if kwargs.get('num_classes') == num_classes:
    del kwargs['num_classes']
  try:
    text = json.dumps(kwargs)
  except TypeError as e:
    raise ConfigError(
      f'{cls.__name__} cannot be written to config.json ({e}): give its '
      f'fields plain values (numbers, strings, tuples, dicts)'
    ) from None
  return f'{cls.__module__}:{cls.__qualname__}', text


def _check_signature(model: nn.Module, name: str) -> None:
  signature = inspect.signature(_network_class(model).__call__)
  try:
    signature.bind(model, 'images', train=False)
  except TypeError:
    raise ConfigError(
      f'{name}.__call__{signature} must take (self, images, train: bool): the '
      f'pipeline calls model.apply(variables, images, train=...)'
    ) from None


def _run(name: str, what: str, fn, *args):
  """``jax.eval_shape(fn, *args)``: shapes only, nothing computed; an error the user's
  module raises becomes one line."""
  try:
    return jax.eval_shape(fn, *args)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001  (the user's code: any error is answered in one line)
    raise ConfigError(
      f'{name} fails {what}: {_one_line(e)}; fix the module or the values it was given '
      f'({KWARGS_FIELD})'
    ) from None


def _uncounted_kernels(variables: dict) -> list:
  """Layers holding a kernel (a parameter named ``kernel``: flax's Conv, Dense, Linear,
  Einsum) whose MACs no pgnas_jax layer records."""
  counted = set(layers.searchable_conv_paths(variables[layers.MASKS]))
  counted |= set(traverse_util.flatten_dict(variables.get(layers.FIXED_MACS, {})))
  counted = {path[:-1] if path[-1] == 'macs' else path for path in counted}
  out = []
  for path in traverse_util.flatten_dict(variables['params']):
    layer = path[:-1]
    if path[-1] == 'kernel' and layer not in counted and layer[:-1] not in counted:
      out.append('/'.join(layer))
  return out


def check(model: nn.Module, dataset, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError with one line when the pipeline cannot search ``model`` on
  ``dataset`` with ``config``: shapes only, at the batch sizes the run will use."""
  name = _network_class(model).__name__
  if isinstance(model, nnx_bridge.FromNNX) and config.search.bn_recalibration_batches:
    raise ConfigError(
      f'--config.search.bn_recalibration_batches={config.search.bn_recalibration_batches}: '
      f're-estimating BatchNorm statistics per candidate is not available for an NNX network '
      f'({name}); set it to 0'
    )
  image_shape, num_classes = tuple(dataset.image_shape), dataset.num_classes
  _check_signature(model, name)
  images = jnp.zeros((2,) + image_shape, jnp.float32)
  variables = _run(
    name,
    f'at init on images of shape {images.shape}',
    lambda k: model.init({'params': k}, images, train=False),
    jax.random.key(0),
  )
  if not variables.get(layers.MASKS):
    raise ConfigError(
      f'{name} has no pgnas_jax.SearchableConv or SearchableDense (pgnas_jax.nnx ones in '
      f'an NNX network): nothing to search; make the convs (dense layers) whose input '
      f'channels (features) should be searched SearchableConv (SearchableDense)'
    )
  uncounted = _uncounted_kernels(variables)
  if uncounted:
    raise ConfigError(
      f'{name}: layer {uncounted[0]!r} holds a kernel the cost model does not '
      f'count (a flax Conv, Dense or Linear?); use pgnas_jax.Conv or pgnas_jax.Dense '
      f'(pgnas_jax.nnx.Conv or .Dense in an NNX network), which record their MACs'
    )
  trained = {k: v for k, v in variables.items() if k in ('params', 'batch_stats', layers.MASKS)}
  logits = _run(
    name,
    'with train=False (BatchNorm must then use its running statistics: '
    'use_running_average=not train)',
    lambda v: model.apply(v, images, train=False),
    trained,
  )
  if getattr(logits, 'shape', None) != (2, num_classes):
    raise ConfigError(
      f'{name} returns {getattr(logits, "shape", type(logits).__name__)} for '
      f'{images.shape[0]} images; it must return logits of shape [batch, '
      f'{num_classes}] (the data set has {num_classes} classes)'
    )
  for batch, train in ((config.train.batch_size, True), (config.search.eval_batch_size, False)):
    _run(
      name,
      f'with train={train} on a batch of {batch} images (train.batch_size, search.eval_batch_size)',
      lambda v, k, x, t=train: model.apply(
        v, x, train=t, rngs={'shake': k}, mutable=['batch_stats', layers.AUXILIARY_LOGITS]
      ),
      trained,
      jax.random.key(0),
      jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32),
    )
