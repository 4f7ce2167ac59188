"""Posterior-guided search (Alg. 1 lines 7-16): sample hard candidate masks from the learned
drop probabilities, score chunks of them at once on the held-out validation split
(``jax.vmap`` over masks, every candidate of a chunk seeing the same batches), rank, and
pick the winner (best validation accuracy; ties: fewer parameters)."""

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgnas_jax.errors import ConfigError, Preempted
from pgnas_jax import budget as budget_lib
from pgnas_jax.backends.cpu import ops as cpu_ops
from pgnas_jax import layers
from pgnas_jax import masks as masks_lib
from pgnas_jax import metric_writers, parallel, precision, train
from pgnas_jax import records as records_lib
from pgnas_jax import samplers as samplers_lib
from pgnas_jax import space as space_lib

PyTree = Any


def _batch_scores(logits, batch):
  """(correct, summed loss) over the real examples of a padded batch."""
  w = batch['weights']
  correct = jnp.sum((jnp.argmax(logits, -1) == batch['labels']) * w)
  loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels']) * w)
  return correct, loss


def _batch_norm_in_train_mode(next_fun, args, kwargs, context):
  """A flax method interceptor: every BatchNorm normalises with its batch's statistics, as
  in training, and stores them (momentum 0) as its running statistics; every other layer
  keeps the mode the model was called in (evaluation: no shake-shake noise, hard masks)."""
  module = context.module
  if not (
    isinstance(module, nn.BatchNorm)
    and context.method_name == '__call__'
    and module.use_running_average is not False
  ):  # not the train-mode copy below
    return next_fun(*args, **kwargs)
  in_train_mode = module.clone(parent=None, use_running_average=False, momentum=0.0)
  variables = {c: module.variables[c] for c in ('params', 'batch_stats') if c in module.variables}
  y, updates = in_train_mode.apply(variables, *args, mutable=['batch_stats'], **kwargs)
  for name, value in updates['batch_stats'].items():
    module.put_variable('batch_stats', name, value)
  return y


def batch_statistics(
  model, variables: dict, mask: PyTree, images: jax.Array, compute_dtype: str
) -> PyTree:
  """The BatchNorm statistics of the architecture ``mask`` on one batch: every layer's mean
  and variance over ``images``, each normalising with its own batch statistics."""
  with nn.intercept_methods(_batch_norm_in_train_mode):
    _, updates = precision.apply(
      model,
      {**variables, 'masks': mask},
      images,
      compute_dtype,
      train=False,
      mutable=['batch_stats'],
    )
  return updates['batch_stats']


@functools.cache
def make_chunk_recalibrator(model, mesh, compute_dtype: str) -> Callable:
  """``recalibrate(variables, masks, images) -> batch_stats`` for a chunk of K hard masks
  split over the devices: each candidate's BatchNorm statistics re-estimated on the
  calibration batches ``images`` [R, batch, ...] (the same for every candidate), the mean
  over the R batches of each layer's batch means and variances (as OFA's
  ``set_running_statistics``); leaves with a leading K axis, split as the masks are."""

  def recalibrate_one(variables, mask, images):
    per_batch = jax.lax.map(
      lambda x: batch_statistics(model, variables, mask, x, compute_dtype), images
    )
    return jax.tree.map(lambda s: jnp.mean(s, axis=0), per_batch)

  def recalibrate(variables, masks, images):
    return jax.vmap(recalibrate_one, in_axes=(None, 0, None))(variables, masks, images)

  replicated, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(recalibrate, in_shardings=(replicated, split, replicated), out_shardings=split)


def recalibration_images(dataset, num_batches: int, batch_size: int, mesh) -> jax.Array | None:
  """The first ``num_batches`` full batches of the training split, un-augmented, stacked
  [R, batch, ...] on every device: what every candidate's BatchNorm statistics are
  re-estimated on (``search.bn_recalibration_batches``); None when it is 0."""
  if num_batches == 0:
    return None
  batches = list(itertools.islice(dataset.eval_batches(dataset.train, batch_size), num_batches))
  if len(batches) < num_batches or not all(b['weights'].all() for b in batches):
    raise ConfigError(
      f'--config.search.bn_recalibration_batches={num_batches} batches of '
      f'{batch_size} images need {num_batches * batch_size} training images, the training '
      f'split has {dataset.train.num_examples}: use fewer batches or a smaller '
      f'search.eval_batch_size'
    )
  return parallel.put_replicated(np.stack([b['images'] for b in batches]), mesh)


@functools.cache
def make_chunk_scorer(model, mesh, compute_dtype: str, with_batch_stats: bool = False) -> Callable:
  """``score(variables, masks, batch) -> (correct[K], loss_sum[K])`` for a chunk of K hard
  masks (leaves with a leading K axis), vmapped over a device's masks (a device's lone
  candidate: its mask folded into the kernels, the same scores); with ``with_batch_stats``,
  ``masks`` is a pair (masks, batch_stats): each candidate with its own BatchNorm statistics
  (``make_chunk_recalibrator``). The chunk's candidates are
  split over the devices of every process (K a multiple of the device count), each device
  scoring its own on the whole batch: measured faster than splitting the batch's rows
  (docs/scaling.md). Every process gets all K results. One jitted function per (model, mesh,
  dtype) (a model is a hashable description of its module): searches of equal
  super-networks in one process share its compilations."""

  def score_one(variables, mask, batch, folded: bool):
    if with_batch_stats:
      mask, stats = mask
      variables = {**variables, 'batch_stats': stats}
    if folded:  # the hard mask zeroes the kernels' dropped input channels instead
      variables = {**variables, 'params': layers.mask_params(variables['params'], mask, mask)}
    else:
      variables = {**variables, 'masks': mask}
    logits = precision.apply(model, variables, batch['images'], compute_dtype, train=False)
    return _batch_scores(logits, batch)

  def score_on_device(variables, masks, batch):
    """This device's candidates. One alone is scored with its mask folded into the kernels:
    the same products and sums (a dropped channel adds x * 0 or 0 * w), so the same scores,
    without a pass over every masked activation (7-9% faster on a CPU core)."""
    if jax.tree.leaves(masks)[0].shape[0] == 1:
      one = jax.tree.map(lambda m: m[0], masks)
      with cpu_ops.in_use(mesh, per_device=True):
        scores = score_one(variables, one, batch, folded=True)
      return jax.tree.map(lambda s: s[None], scores)
    return jax.vmap(functools.partial(score_one, folded=False), in_axes=(None, 0, None))(
      variables, masks, batch
    )

  chunk, whole = jax.sharding.PartitionSpec(parallel.DATA_AXIS), jax.sharding.PartitionSpec()
  replicated = parallel.replicated(mesh)
  return jax.jit(
    jax.shard_map(score_on_device, mesh=mesh, in_specs=(whole, chunk, whole), out_specs=chunk),
    in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
    out_shardings=replicated,
  )


@functools.cache
def make_full_scorer(model, mesh, compute_dtype: str) -> Callable:
  """Scores one network: the full super-network, or a masked one when ``variables`` holds
  ``masks``. The batch stays where it was placed (rows split or whole on every device). One
  jitted function per (model, mesh, dtype): the full super-network, the winner and its
  fine-tuned weights are scored by one compilation per batch shape."""

  def score(variables, batch):
    logits = precision.apply(model, variables, batch['images'], compute_dtype, train=False)
    return _batch_scores(logits, batch)

  return jax.jit(score, out_shardings=parallel.replicated(mesh))


# Images per device and call (candidates per device x batch) that 'auto' aims for. CPU:
# where scoring measured fastest on a 2-core machine, about 80 to 100 images per call, for
# the vmapped scorer and a plain forward alike (benchmarks/ranking.py, docs/benchmarks.md);
# larger calls leave the caches and slow down. Accelerators: large enough to keep the chip
# busy; free memory sets the limit there.
IMAGES_PER_CALL = {'cpu': 100}
ACCELERATOR_IMAGES_PER_CALL = 16384
MEMORY_SHARE = 0.5  # of the free device memory that a chunk's activations may take


def _free_memory_bytes(device) -> int | None:
  stats = device.memory_stats()
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  if device.platform == 'cpu':
    free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    return free // len(jax.local_devices())
  return None


def evaluate(scorer: Callable, args: tuple, batches: list) -> tuple:
  """(accuracy, mean loss) over all batches; arrays of shape [K] for a chunk scorer."""
  correct, loss, n = 0.0, 0.0, 0.0
  for batch in batches:
    batch_correct, batch_loss = scorer(*args, batch)
    correct = correct + np.asarray(batch_correct, np.float64)
    loss = loss + np.asarray(batch_loss, np.float64)
    n += float(np.sum(batch['weights']))
  return correct / n, loss / n


class Scorer(NamedTuple):
  """Scores networks of the super-network ``model`` on ``mesh`` in ``compute_dtype`` over a
  split's batches (``data.device_batches`` for one network, ``data.replicated_batches`` for
  chunks of candidates), through the compiled functions that every scorer of the same three
  shares."""

  model: Any
  mesh: jax.sharding.Mesh
  compute_dtype: str

  def network(self, variables: dict, batches) -> tuple:
    """(accuracy, mean loss) of the full super-network, or of a masked one when
    ``variables`` holds ``masks``."""
    return evaluate(make_full_scorer(*self), (variables,), batches)

  def architecture(self, variables: dict, mask: PyTree, batches) -> tuple:
    """(accuracy, mean loss) of the architecture that the hard ``mask`` keeps."""
    acc, loss = self.network({**variables, 'masks': mask}, batches)
    return float(acc), float(loss)

  def candidates(
    self, variables: dict, masks: PyTree, batches, recalibration: jax.Array | None = None
  ) -> tuple:
    """(accuracy[K], mean loss[K]) of K candidates (host mask leaves with a leading K axis,
    K a multiple of the device count); with ``recalibration`` (``recalibration_images``),
    each with its BatchNorm statistics re-estimated on those images first."""
    masks = parallel.put_split(masks, self.mesh)
    if recalibration is None:
      return evaluate(make_chunk_scorer(*self), (variables, masks), batches)
    stats = make_chunk_recalibrator(*self)(variables, masks, recalibration)
    return evaluate(
      make_chunk_scorer(*self, with_batch_stats=True), (variables, (masks, stats)), batches
    )

  def recalibrated(self, variables: dict, mask: PyTree, recalibration: jax.Array | None) -> dict:
    """``variables`` with the BatchNorm statistics that candidate ``mask`` (host leaves, no
    candidate axis) was scored with: its re-estimated ones, or the trained ones when
    ``recalibration`` is None."""
    if recalibration is None:
      return variables
    n = self.mesh.devices.size  # the chunk is split over the devices: one copy on each
    masks = parallel.put_split(jax.tree.map(lambda m: np.repeat(m[None], n, 0), mask), self.mesh)
    stats = make_chunk_recalibrator(*self)(variables, masks, recalibration)
    return {
      **variables,
      'batch_stats': jax.tree.map(lambda s: np.asarray(s[0]), jax.device_get(stats)),
    }

  def auto_chunk_size(
    self, variables: dict, space: space_lib.SearchSpace, batch: dict, num_candidates: int
  ) -> int:
    """The chunk size ``search.chunk_size='auto'`` means. Each device scores its share of
    the chunk on the whole batch; it gets enough candidates for the platform's target images
    per call (``IMAGES_PER_CALL``), fewer if their activations would take more than
    ``MEMORY_SHARE`` of its free memory, never more than needed for ``num_candidates``. One
    candidate's activation memory is the difference between the compiled scorer's
    temporaries at 2 and at 1 candidates per device. The result is a multiple of the device
    count, the same on every process (the smallest they find), and the same for a given
    machine, network and batch size."""
    mesh = self.mesh
    n = mesh.devices.size
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    target = IMAGES_PER_CALL.get(device.platform, ACCELERATOR_IMAGES_PER_CALL)
    per_device = max(1, target // batch['images'].shape[0])
    free = _free_memory_bytes(device)
    scorer = make_chunk_scorer(*self)

    def temporaries(k):
      masks = parallel.put_split(
        jax.tree.map(lambda m: np.ones((k,) + m.shape, np.float32), space.template), mesh
      )
      analysis = scorer.lower(variables, masks, batch).compile().memory_analysis()
      return None if analysis is None else analysis.temp_size_in_bytes

    one, two = temporaries(n), temporaries(2 * n)
    if free is not None and one is not None and two is not None:
      per_device = min(per_device, max(1, int(MEMORY_SHARE * free) // max(two - one, 1)))
    return n * min(parallel.min_over_processes(per_device), -(-num_candidates // n))


@functools.partial(jax.jit, static_argnames='sampler')
def _draw_packed(search_key, indices, drop_logits, template, sampler) -> dict:
  return sampler.packed(search_key, indices, drop_logits, template)


def draw_candidates(
  search_key: jax.Array,
  indices: jax.Array,
  drop_logits: PyTree,
  template: PyTree,
  sampler: samplers_lib.Sampler = samplers_lib.IID,
) -> PyTree:
  """Hard masks of candidates ``indices`` (leaves with a leading candidate axis), on the
  host: drawn packed by one compiled program (``Sampler.packed``) and split into groups by
  numpy; a program with one output per group compiled for over a minute at D-121's 593
  groups (docs/scaling.md)."""
  packed = jax.device_get(_draw_packed(search_key, indices, drop_logits, template, sampler))
  return masks_lib.unpack(packed, template, leading=1)


def candidate_mask(
  search_key: jax.Array,
  index: int,
  drop_logits: PyTree,
  template: PyTree,
  sampler: samplers_lib.Sampler = samplers_lib.IID,
) -> PyTree:
  """The hard mask of candidate ``index`` alone, as drawn during ranking by ``sampler``."""
  masks = draw_candidates(search_key, jnp.array([index]), drop_logits, template, sampler)
  return jax.tree.map(lambda m: np.asarray(m[0]), masks)


class Validation(NamedTuple):
  """The split candidates are ranked on: its batches (``data.replicated_batches``) and, when
  BatchNorm statistics are re-estimated per candidate, the images for that
  (``recalibration_images``)."""

  batches: Any
  recalibration: jax.Array | None = None


class RankingLog(NamedTuple):
  """Where a ranking goes: its candidates file (``search/candidates.jsonl``), the stop
  requests it obeys, the writer of its best accuracy so far, the budget its records are
  marked against."""

  path: str
  guard: Any  # checkpoint.PreemptionGuard
  writer: metric_writers.MetricWriter = metric_writers.NO_WRITER
  budget: budget_lib.Budget = budget_lib.UNLIMITED  # what the records' ``fits`` says


def budget(config, space: space_lib.SearchSpace, latency=None) -> budget_lib.Budget:
  """The search's budget (``search.max_params``, ``max_flops``, ``max_latency_ms``, else the
  objective's targets) for this space; ``latency``: the run's ``latency_table.Table``."""
  full_params, full_flops = space_lib.costs(space, space.template)
  full_ms = None if latency is None else latency.full_ms
  return budget_lib.Budget.from_config(config, full_params, full_flops, full_ms)


def rank_candidates(
  scorer: Scorer,
  state: train.TrainState,
  space: space_lib.SearchSpace,
  validation: Validation,
  search_config,
  sampler: samplers_lib.Sampler,
  log: RankingLog,
) -> list:
  """Scores candidates 0..C-1 of the posterior that training left in ``state`` on the
  validation split, continuing after the valid lines of this run already in ``log.path``
  (``records.resume``); each chunk's lines are appended durably (flush + fsync) once
  scored, by process 0. Every process scores every chunk (its validation rows on its
  devices) and gets all the records. A candidate's mask is not kept: it follows from
  (search key, index) and ``sampler`` (``search.sampler`` in channel blocks), see
  ``candidate_mask``. ``log.writer`` gets the best validation accuracy so far against the
  number of candidates scored, after each chunk. Every candidate is scored; ``fits``
  records whether it fits the search's budget. With ``validation.recalibration`` each
  candidate's BatchNorm statistics are re-estimated before it is scored."""
  num, chunk = sampler.num_candidates(search_config.num_candidates), search_config.chunk_size
  if num < search_config.num_candidates:
    logging.info(
      "search: sampler '%s' has one candidate; search.num_candidates=%d counts as 1",
      sampler.name,
      search_config.num_candidates,
    )
  if chunk == 'auto':
    chunk = scorer.auto_chunk_size(state.variables, space, next(iter(validation.batches)), num)
    logging.info('search: chunk size %d (auto)', chunk)
  search_key = state.key('search')
  run = records_lib.run_id(search_key, state.drop_logits, state.variables, sampler.id)
  records = records_lib.resume(log.path, run)
  if records:
    logging.info('search: resuming after %d recorded candidates', len(records))
  resumed, start = len(records), time.time()
  for first in range(resumed, num, chunk):
    # the last chunk is padded with extra candidates (one compilation) and trimmed
    indices = jnp.arange(first, first + chunk)
    masks = draw_candidates(search_key, indices, state.drop_logits, space.template, sampler)
    scores = scorer.candidates(state.variables, masks, *validation)
    new = _records(run, first, scores, space, masks, min(chunk, num - first))
    new = budget_lib.mark(new, log.budget)
    if parallel.is_main_process():
      records_lib.append(log.path, new)
    records += new
    done = first + len(new)
    _show_progress(log, records, done, num, (done - resumed) / (time.time() - start))
    if parallel.any_process(log.guard.requested) and done < num:
      raise Preempted(
        f'stopped by {log.guard.signal_name} after {done} scored candidates, all recorded in '
        f'{log.path}. Run the same command again to resume'
      )
  return records


def _records(run: str, first: int, scores: tuple, space, masks, count: int) -> list:
  """Records of the ``count`` candidates from ``first`` on, of a chunk whose ``masks`` the
  scorer gave ``scores`` (accuracies, mean losses)."""
  acc, loss = scores
  params, macs = space_lib.costs(space, masks)
  dropped = space_lib.kept_counts(space.template) - space_lib.kept_counts(masks)
  names = space_lib.group_names(space)
  return [
    records_lib.make(
      run,
      first + j,
      (float(acc[j]), float(loss[j])),
      (int(params[j]), int(macs[j])),
      dict(zip(names, dropped[j].tolist())),
    )
    for j in range(count)
  ]


def _show_progress(log: RankingLog, records: list, done: int, num: int, rate: float) -> None:
  """The best validation accuracy so far to ``log.writer``, and a progress line."""
  best = max(records, key=lambda r: r['val_acc'])
  log.writer.write_scalars(done, {'best_val_acc': best['val_acc']})
  logging.info(
    'search %d/%d candidates  best val acc %.4f (#%d)  %.2f cand/s  eta %.0fs',
    done,
    num,
    best['val_acc'],
    best['index'],
    rate,
    (num - done) / rate,
  )


def ranking_key(record: dict) -> tuple:
  """Sort key of the ranking: best validation accuracy first; ties broken by fewer
  parameters, then lower index."""
  return -record['val_acc'], record['params'], record['index']


def choose_winner(records: list, budget: budget_lib.Budget = budget_lib.UNLIMITED) -> dict:
  """The first candidate of the ranking (``ranking_key``) among those that fit ``budget``;
  BudgetError, saying what to change, when none does."""
  return min(budget_lib.fitting(records, budget), key=ranking_key)
