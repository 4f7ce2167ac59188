"""A candidate's inference latency predicted from a per-layer table (SPEC section 7):
``latency_ms`` of ``search/candidates.jsonl``, the budget ``search.max_latency_ms`` and the
training target ``objective.target_latency_ms``.

A candidate's compact network (``compact/``) is traced at ``search.latency_batch_size``
images and each of its convolutions is looked up in the table: the median milliseconds of
that one convolution (image size, window, stride, dilation, depthwise or not, input and
output widths) on this device, measured alone at exactly those widths: on a CPU a width
that is not a multiple of the vector length can cost more than the next one that is
(``benchmarks/latency_prediction.py``), so no width is interpolated. The sum goes through a
line fitted to two networks measured whole, the full one and the smallest candidate: its
slope is how much of the convolutions' isolated time a whole network spends (branches run
side by side), its offset what lies between them (activations, joins, pooling, the
classifier).

Entries are measured when first needed, once per device and batch, and kept for later runs in
``~/.cache/pgnas_jax/latency/``; a run keeps the table it used in
``search/latency_table.json``, so a resumed run predicts the same numbers. With several
processes only process 0 measures and writes; the others read the run's table.
"""

import hashlib
import json
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from pgnas_jax import compact, layers, parallel, targets
from pgnas_jax.errors import ConfigError
from pgnas_jax import records as records_lib
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.compact import derived
from pgnas_jax.compact import latency as measuring

REPEATS = 10  # calls timed per table entry (after compact.latency's warm-up)
WHOLE_ROUNDS = 5  # windows, in turn, of the full and the smallest network (the line's ends)
FRONT_MEASURED = 12  # candidates of the accuracy-latency front measured against the table


def wanted(config) -> bool:
  """Whether the run predicts its candidates' latency."""
  return bool(
    config.search.predict_latency
    or config.search.max_latency_ms
    or config.objective.target_latency_ms
  )


class Conv(NamedTuple):
  """One convolution of a compact network, as the table knows it."""

  height: int
  width: int
  window: tuple
  stride: int
  dilation: int
  depthwise: bool
  inputs: int
  outputs: int

  def key(self) -> str:
    kind = 'depthwise ' if self.depthwise else ''
    return (
      f'{kind}{self.height}x{self.width} {self.window[0]}x{self.window[1]}/{self.stride} '
      f'dilation {self.dilation}: {self.inputs} -> {self.outputs}'
    )


def convs_of(net: compact.CompactNet, batch: int) -> list:
  """The convolutions of ``net`` on ``batch`` images, in the order it runs them."""
  return [
    Conv(x[1], x[2], kernel[:2], strides[0], dilation[0], groups > 1, x[-1], kernel[-1])
    for kind, x, kernel, strides, dilation, groups, _ in compact.layers(net, batch)
    if kind == 'conv'
  ]


class Table(NamedTuple):
  """The run's latency model (``search/latency_table.json``): a candidate takes
  ``offset_ms + scale * (its convolutions' entries)``, the line through the two networks
  measured whole, the full one and the smallest (every searchable channel dropped), which
  accounts for what the entries leave out (the layers between convolutions, branches run
  side by side)."""

  device: str
  batch: int
  entries: dict  # Conv.key() -> median ms of that convolution alone
  call_ms: float  # what calling a compiled program costs, in every entry: taken out of it
  full_ms: float  # the full compact network, measured
  smallest_ms: float  # the smallest candidate's compact network, measured
  offset_ms: float
  scale: float
  channel_ms: list  # per group (flattening order): what one kept channel costs (SPEC 7)

  def convs_ms(self, convs: list) -> float:
    return sum(self.entries[c.key()] - self.call_ms for c in convs)

  def predict(self, convs: list) -> float:
    return self.offset_ms + self.scale * self.convs_ms(convs)


class Predictor:
  """Builds a candidate's compact network and predicts its latency; measures what the
  table lacks (process 0), keeping the device cache and the run's table up to date."""

  def __init__(self, model, variables: dict, image_shape: tuple, batch: int):
    self.model, self.image_shape, self.batch = model, tuple(image_shape), batch
    self.variables = {
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),
    }
    self.device = measuring.describe_device()

  def convs(self, mask) -> list:
    return convs_of(compact.build(self.model, self.variables, mask, self.image_shape), self.batch)

  def measured(self, entries: dict, convs: list) -> dict:
    """``entries`` with every convolution of ``convs``, measured where missing (the
    device cache first)."""
    needed = {c.key(): c for c in convs}
    missing = [c for k, c in needed.items() if k not in entries]
    if not missing:
      return entries
    cache = _read_cache(self.device, self.batch)
    entries = {**entries, **{c.key(): cache[c.key()] for c in missing if c.key() in cache}}
    unmeasured = [c for c in missing if c.key() not in entries]
    for i, conv in enumerate(unmeasured):
      if i % 20 == 0:
        logging.info('latency table: measuring %d/%d convolutions', i, len(unmeasured))
      entries[conv.key()] = _measure(conv, self.batch)
    if unmeasured:
      _write_cache(self.device, self.batch, {c.key(): entries[c.key()] for c in unmeasured})
    return entries

  def table(self, space: space_lib.SearchSpace, multiple: int) -> Table:
    """The table of a new run: its entries, the full and the smallest network measured
    whole, and each group's per-channel cost (SPEC section 7)."""
    smallest_mask = jax.tree.map(np.zeros_like, _numpy(space.template))
    (full_ms, smallest_ms), (full, smallest) = self.whole_ms(
      [space.template, smallest_mask], rounds=WHOLE_ROUNDS
    )
    halves = {c: (dropped, self.convs(m)) for c, (dropped, m) in _halved(space, multiple).items()}
    needed = full + smallest + [c for _, convs in halves.values() for c in convs]
    entries = self.measured({}, needed)
    call_ms = measuring.median_ms(lambda x: x + 1.0, np.zeros((1,), np.float32))
    table = Table(self.device, self.batch, entries, call_ms, full_ms, smallest_ms, 0.0, 1.0, [])
    full_sum, smallest_sum = table.convs_ms(full), table.convs_ms(smallest)
    scale = (full_ms - smallest_ms) / (full_sum - smallest_sum) if full_sum > smallest_sum else 1.0
    per_channel = {  # a saving lost in the timing noise counts as none, never as a cost
      conv: max(0.0, scale * (full_sum - table.convs_ms(convs)) / dropped)
      for conv, (dropped, convs) in halves.items()
    }
    return table._replace(
      offset_ms=full_ms - scale * full_sum,
      scale=scale,
      channel_ms=[per_channel[path[:-1]] for path in space_lib.group_paths(space)],
    )

  def whole_ms(self, masks: list, rounds: int = 1) -> tuple:
    """([measured ms], [convolutions]) of the compact networks of ``masks``, timed in turn
    for ``rounds`` windows each (a median of ``compact.latency.REPEATS`` calls), the median
    window kept: a passing disturbance of the machine is outvoted."""
    images = np.zeros((self.batch,) + self.image_shape, np.float32)
    timers, convs = [], []
    for mask in masks:
      net = compact.build(self.model, self.variables, mask, self.image_shape)
      weights = jax.device_put(net.weights, jax.devices()[0])
      timers.append(measuring.timer(compact.inference_fn(net), weights, images))
      convs.append(convs_of(net, self.batch))
    windows = [[t() for t in timers] for _ in range(rounds)]
    return [float(np.median(w)) for w in zip(*windows)], convs


def _measure(conv: Conv, batch: int) -> float:
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, conv.height, conv.width, conv.inputs), np.float32)
  groups = conv.inputs if conv.depthwise else 1
  kernel = rng.standard_normal(conv.window + (conv.inputs // groups, conv.outputs), np.float32)
  device = jax.devices()[0]
  return measuring.median_ms(
    lambda k, x: derived.same_conv(x, k, conv.stride, conv.dilation, groups),
    jax.device_put(kernel, device),
    jax.device_put(images, device),
    repeats=REPEATS,
  )


def _numpy(tree):
  """A writable float32 NumPy copy of a mask tree."""
  return jax.tree.map(lambda t: np.array(t, np.float32), jax.device_get(tree))


def _halved(space: space_lib.SearchSpace, multiple: int) -> dict:
  """Per searchable conv: (channels dropped, the mask that keeps every channel but half of
  each of that conv's groups, in whole blocks of ``multiple``; one block at least)."""
  template = _numpy(space.template)
  out = {}
  for conv, groups in layers.groups_by_conv(template).items():
    mask, dropped = _numpy(template), 0
    for path in groups:
      leaf = _leaf(mask, path)
      drop = max(1, leaf.shape[0] // multiple // 2) * multiple
      leaf[leaf.shape[0] - drop :] = 0.0
      dropped += drop
    out[conv] = (dropped, mask)
  return out


def _leaf(tree, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def _cache_path(device: str, batch: int) -> str:
  digest = hashlib.sha256(f'{device} batch {batch}'.encode()).hexdigest()[:16]
  return os.path.join(workdir_lib.cache_dir(), 'latency', f'{digest}.json')


def _read_cache(device: str, batch: int) -> dict:
  path = _cache_path(device, batch)
  try:
    with open(path) as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return {}
  if cached.get('device') != device or cached.get('batch') != batch:
    return {}
  return cached.get('entries', {})


def _write_cache(device: str, batch: int, entries: dict) -> None:
  """Adds ``entries`` to the device cache; a cache that cannot be written costs only the
  measuring next time."""
  path = _cache_path(device, batch)
  merged = {**_read_cache(device, batch), **entries}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    workdir_lib.write_json(path, {'device': device, 'batch': batch, 'entries': merged})
  except OSError as e:
    logging.warning('latency table: the cache %s could not be written (%s)', path, e)


def for_run(config, model, image_shape: tuple, resumed_in: str | None) -> Table | None:
  """The run's table: the one saved in ``resumed_in`` (a resumed run's workdir) if any, else
  made on this machine; None when the run predicts no latency. Checked before the workdir
  is touched: a network whose compact network cannot be derived has none to predict from."""
  if not wanted(config):
    return None
  variables = space_lib.initial_variables(model, image_shape, jax.random.key(0))
  try:
    compact.build(model, variables, variables[layers.MASKS], image_shape)
  except compact.Unsupported as e:
    raise ConfigError(
      f'latency is predicted from the compact network, which this network has none of ({e}): '
      'set no search.max_latency_ms, objective.target_latency_ms or search.predict_latency'
    ) from None
  saved = read(resumed_in) if resumed_in else None
  if saved is not None:
    return saved
  predictor = Predictor(model, variables, image_shape, config.search.latency_batch_size)
  logging.info('latency table: measuring on %s', predictor.device)
  space = space_lib.from_variables(variables)
  return predictor.table(space, targets.channel_multiple(config, space.template))


def read(workdir: str) -> Table | None:
  path = workdir_lib.path(workdir, workdir_lib.LATENCY_TABLE)
  if not os.path.exists(path):
    return None
  return Table(**workdir_lib.read_json(path))


def shared(table: Table, workdir: str, writes: bool) -> Table:
  """``table`` as every process reads it from the run's workdir once process 0 wrote it."""
  if writes:
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.LATENCY_TABLE), table._asdict())
  parallel.barrier('latency table written')
  return read(workdir)


def predicted(records: list, table: Table, predictor: Predictor, mask_of, where: tuple) -> tuple:
  """(``records`` each with its predicted ``latency_ms``, the run's table with any entries
  they needed). ``mask_of(index)``: a candidate's hard mask; ``where``: (workdir, whether
  this process writes)."""
  missing = [r for r in records if 'latency_ms' not in r]
  if not missing:
    return records, table
  convs = {}
  for i, record in enumerate(missing):
    if i % 100 == 0:
      logging.info('latency: predicting candidates %d/%d', i, len(missing))
    convs[record['index']] = predictor.convs(mask_of(record['index']))
  workdir, writes = where
  if writes:
    entries = predictor.measured(table.entries, [c for cs in convs.values() for c in cs])
    table = table._replace(entries=entries)
  table = shared(table, workdir, writes)
  return [
    records_lib.amend(r, latency_ms=table.predict(convs[r['index']]))
    if 'latency_ms' not in r
    else r
    for r in records
  ], table


def measured_on_front(front: list, predictor: Predictor, mask_of) -> list:
  """For each candidate of the accuracy-latency front (``FRONT_MEASURED`` of them at most):
  its index, predicted and measured latency (the compact network at the table's batch,
  median as ``compact.latency``)."""
  if len(front) > FRONT_MEASURED:  # spread along the front, both ends kept
    picks = np.linspace(0, len(front) - 1, FRONT_MEASURED).round().astype(int)
    front = [front[i] for i in sorted(set(picks.tolist()))]
  return [
    {
      'index': r['index'],
      'predicted_ms': r['latency_ms'],
      'measured_ms': predictor.whole_ms([mask_of(r['index'])])[0][0],
    }
    for r in front
  ]
