"""The main job, stage by stage: train the super-network -> its posterior -> rank candidates
sampled from it -> test and export the winner -> fine-tune it (``finetune.steps``) -> write
the outputs. Each stage is a function of the run context (``context.Context``) and the
typed results of the stages before it; every file the stages leave is written by
``outputs.Outputs``, on process 0. ``run`` returns the typed ``Result`` that the studies
use, and ``search_network`` is the same job from Python on a module and a data source."""

import contextlib
import copy
import errno
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import config as config_lib
from pgnas_jax import context as context_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, export, finetune, metric_writers, parallel, pareto, resume, samplers
from pgnas_jax import budget as budget_lib
from pgnas_jax import lock as lock_lib
from pgnas_jax import masks as masks_lib
from pgnas_jax import outputs as outputs_lib
from pgnas_jax import records as records_lib
from pgnas_jax import latency_table, pretrained, search, supernets, targets, train
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.supernets import custom
from pgnas_jax.trained import Trained

PyTree = Any


class Ranking(NamedTuple):
  """What the search stage leaves: every candidate's record, the winner among those that fit
  the budget, its mask and its variables as scored (with re-estimated BatchNorm statistics
  when ``search.bn_recalibration_batches`` is on)."""

  records: list
  budget: budget_lib.Budget
  winner: dict  # the winner's record
  mask: PyTree
  variables: dict
  supernet: dict  # the full super-network's validation accuracy, params and FLOPs
  scorer: search.Scorer
  validation: Any  # the validation split's batches, as the scorer takes them


class Result(NamedTuple):
  """A finished run: what ``search/arch.json``, ``posterior.json``,
  ``search/candidates.jsonl`` and ``timings.json`` hold."""

  arch: dict
  posterior: list
  records: list
  winner: dict
  timings: dict

  @classmethod
  def read(cls, workdir: str) -> 'Result':
    """The result of the finished run in ``workdir``, from its files."""
    read = lambda name: workdir_lib.read_json(workdir_lib.path(workdir, name))
    arch = read(workdir_lib.ARCH)
    records = records_lib.read(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
    winner = next(r for r in records if r['index'] == arch['index'])
    return cls(arch, read(workdir_lib.POSTERIOR), records, winner, read(workdir_lib.TIMINGS))


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  start_over: bool = False,
  model=None,
  dataset: data_lib.Source | None = None,
) -> Result:
  """Runs the whole job, or resumes it where it stopped when the workdir holds it. ``model``
  and ``dataset`` replace those the config names (``search_network``). The job holds the
  workdir's lock (``lock.py``) from before it reads the workdir to the end."""
  config_lib.validate(config)
  checkpoint_lib.check_path(workdir)
  mesh = parallel.make_mesh()
  config_lib.validate_for_devices(config, mesh.devices.size)
  with lock_lib.WorkdirLock(workdir) as held:
    plan = resume.plan(workdir, config, start_over)
    if plan == 'finished':
      logging.info('%s holds a finished run (%s); nothing to do', workdir, workdir_lib.REPORT)
      return Result.read(workdir)
    if plan == 'resume' and start_over:
      logging.info('resuming the run that --start_over began in %s', workdir)
    resumed_in = workdir if plan == 'resume' else None
    dataset, model, latency = _checked_inputs(config, model, dataset, resumed_in)
    source = custom.source(model) if config.model.family == 'custom' else None
    if plan == 'resume':
      custom.check_source(workdir, source)
    # With several processes the workdir is shared: every process has read it above before
    # process 0 changes it, and none goes on before it is ready.
    parallel.barrier('workdir checked')
    with _disk_full_answered(workdir, config, model, dataset):
      if parallel.is_main_process():
        held.claim()
        _prepare(workdir, config, plan == 'fresh' and start_over, source)
      parallel.barrier('workdir ready')
      if latency is not None:  # every process predicts from process 0's table
        latency = latency_table.shared(latency, workdir, parallel.is_main_process())
      checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
      try:
        with checkpoint_lib.PreemptionGuard() as guard:
          writes = parallel.is_main_process()
          ctx = context_lib.Context(
            config, workdir, mesh, dataset, model, checkpointer, guard, writes, latency
          )
          return run_stages(ctx)
      finally:
        checkpointer.close()


def _checked_inputs(config, model, dataset, resumed_in: str | None) -> tuple:
  """(data set, model, the run's latency table or None: the one saved in ``resumed_in``, a
  resumed run's workdir), loaded where not given and checked, before the workdir is
  touched: the data may be missing, a user's module may not fit it, a target may be out of
  reach."""
  if dataset is None:
    dataset = data_lib.load(config.data)
  data_lib.check_fits(dataset, config.train)
  train.setup(config, dataset)  # refuses a length that gives no training step
  if model is None:
    model = supernets.build(config.model, dataset.num_classes)
  if config.model.family == 'custom':
    custom.check(model, dataset, config)
  if config.train.init_from:  # the file fits the model
    pretrained.load(config.train.init_from, _variable_shapes(model, dataset))
  latency = latency_table.for_run(config, model, dataset.image_shape, resumed_in)
  if targets.steered(config) or config.search.channel_multiple not in (1, 'auto'):
    space = space_lib.of_model(model, dataset.image_shape)
    targets.from_config(config, space, 1, latency)
    sizes = dict(zip(space_lib.group_names(space), masks_lib.channel_counts(space.template)))
    samplers.check_blocks(targets.channel_multiple(config, space.template), sizes)
  return dataset, model, latency


def _prepare(workdir: str, config, fresh_start: bool, source: dict | None) -> None:
  """The workdir made ready: emptied for ``--start_over``, its folders, config.json and, for
  a custom module, the source it runs (``custom.source``)."""
  if fresh_start:
    resume.start_over(workdir)
  os.makedirs(workdir_lib.path(workdir, workdir_lib.SEARCH), exist_ok=True)
  os.makedirs(workdir_lib.path(workdir, workdir_lib.PLOTS), exist_ok=True)
  workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.CONFIG), config.to_dict())
  if source is not None:
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.MODULE_SOURCE), source)
  if fresh_start:  # marks the run as --start_over's, see resume.plan
    workdir_lib.write_atomically(workdir_lib.path(workdir, workdir_lib.STARTED_OVER), '')


@contextlib.contextmanager
def _disk_full_answered(workdir: str, config, model, dataset):
  """A full disk is answered in one line saying how much the run needs."""
  try:
    yield
  except Exception as e:
    if not _disk_full(e):
      raise
    raise errors.WorkdirError(
      f'no space left on the device of --workdir={workdir}: this run needs about '
      f'{_space_needed(model, config, dataset) / 2**20:.0f} MB there '
      f'({shutil.disk_usage(workdir).free / 2**20:.0f} MB free now); free some and run the '
      f'same command again to resume'
    ) from None


def _disk_full(e: Exception) -> bool:
  """Whether ``e`` is a full disk: Python's own OSError, or the error orbax's writers
  (tensorstore) raise for it, which names the OS error."""
  if isinstance(e, OSError):
    return e.errno == errno.ENOSPC
  return 'No space left on device' in str(e) or "os_error_code='28'" in str(e)


def _variable_shapes(model, dataset) -> dict:
  """The shapes and types of ``model``'s variables on ``dataset``'s images, computing none."""
  return jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0)}, jnp.zeros((1,) + tuple(dataset.image_shape)), train=False
    )
  )


def _space_needed(model, config, dataset) -> int:
  """Bytes a run's outputs take at most: the kept checkpoints (and the one being written) of
  the train state, the winner's weights (input-sliced, fine-tuned, compact) and a margin for
  the logs, plots and StableHLO."""
  shapes = _variable_shapes(model, dataset)
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes['params']))
  state = 2 * weights  # weights + SGD momentum; BatchNorm statistics and logits are small
  return (config.checkpoint.max_to_keep + 1) * state + 3 * weights + 16 * 2**20


def _obey_stop(ctx: context_lib.Context, after: str) -> None:
  """A stop request (SIGTERM, Ctrl-C) is obeyed between stages too, not only inside the
  loops of training, the search and fine-tuning: every stage before is saved or is quick to
  redo."""
  if parallel.any_process(ctx.guard.requested):
    raise errors.Preempted(
      f'stopped by {ctx.guard.signal_name} after {after}; training and the search are '
      f'saved. Run the same command again to resume'
    )


@contextlib.contextmanager
def _timed(timings: dict, phase: str):
  start = time.time()
  yield
  timings[phase] = time.time() - start


def run_stages(ctx: context_lib.Context) -> Result:
  """Every stage in turn, from where the workdir's checkpoints and records leave off."""
  outputs = outputs_lib.Outputs(ctx.workdir, ctx.writes)
  timings = {}
  with _timed(timings, 'train'):
    trained = Trained(ctx.model, *train.train(ctx))
  posterior = trained.posterior()
  outputs.posterior(posterior)
  with _timed(timings, 'search'):
    ranking = rank(ctx, trained, outputs)
  _obey_stop(ctx, 'the search')
  with _timed(timings, 'test and export'):
    arch = test_and_export(ctx, trained, ranking, outputs)
  if ctx.config.finetune.steps > 0:
    _obey_stop(ctx, 'testing and exporting the winner')
    with _timed(timings, 'fine-tune'):
      arch['finetuned'] = finetune_winner(ctx, trained, ranking, outputs)
  _obey_stop(ctx, 'the winner was tested, exported and fine-tuned')
  result = Result(arch, posterior, ranking.records, ranking.winner, timings)
  sampler = _sampler(ctx.config, trained)
  outputs.finished(result, ranking.budget, sampler.num_candidates(ctx.config.search.num_candidates))
  logging.info(
    'winner #%d: val acc %.4f, test acc %.4f, %d params (full super-network: '
    'val %.4f, test %.4f, %d params)',
    arch['index'],
    arch['val_acc'],
    arch['test_acc'],
    arch['params'],
    arch['supernet']['val_acc'],
    arch['supernet']['test_acc'],
    arch['supernet']['params'],
  )
  return result


def rank(ctx: context_lib.Context, trained: Trained, outputs: outputs_lib.Outputs) -> Ranking:
  """Scores the full super-network and every candidate on the validation split; the winner
  is the best that fits the budget (a ``BudgetError`` when none does, after writing the
  fronts that show what a budget can buy)."""
  config, space = ctx.config, trained.space
  eval_batch = config.search.eval_batch_size
  scorer = search.Scorer(ctx.model, ctx.mesh, config.model.compute_dtype)
  validation = data_lib.replicated_batches(
    ctx.dataset.validation, ctx.dataset, eval_batch, ctx.mesh
  )
  full_val, _ = scorer.network(trained.state.variables, validation)
  full_params, full_flops = space_lib.costs(space, space.template)
  supernet = {'val_acc': float(full_val), 'params': int(full_params), 'flops': int(full_flops)}
  if ctx.latency is not None:  # measured when the table was made
    supernet['latency_ms'] = ctx.latency.full_ms
  budget = search.budget(config, space, ctx.latency)
  recalibration = search.recalibration_images(
    ctx.dataset, config.search.bn_recalibration_batches, eval_batch, ctx.mesh
  )
  path = outputs.path(workdir_lib.CANDIDATES)
  with metric_writers.for_search(ctx.workdir, config.log) as writer:
    log = search.RankingLog(path, ctx.guard, writer, budget)
    validation_sets = search.Validation(validation, recalibration)
    sampler = _sampler(config, trained)
    records = search.rank_candidates(
      scorer, trained.state, space, validation_sets, config.search, sampler, log
    )
  if ctx.latency is not None:
    records, _ = latency_table.predicted(
      records, ctx.latency, _predictor(ctx, trained), _mask_of(ctx, trained), _where(ctx)
    )
  records = outputs.budget_marks(records, budget)
  outputs.warn(records_lib.unresolved_ranking(records, config.data.validation_size))
  try:
    winner = search.choose_winner(records, budget)
  except errors.BudgetError:
    outputs.pareto(records, supernet, None, budget)
    raise
  mask = trained.mask(winner['index'], sampler)
  variables = scorer.recalibrated(trained.state.variables, mask, recalibration)
  return Ranking(records, budget, winner, mask, variables, supernet, scorer, validation)


def _predictor(ctx: context_lib.Context, trained: Trained) -> latency_table.Predictor:
  image_shape, batch = ctx.dataset.image_shape, ctx.latency.batch
  return latency_table.Predictor(ctx.model, trained.state.variables, image_shape, batch)


def _mask_of(ctx: context_lib.Context, trained: Trained):
  """A candidate's hard mask by index, as the search drew it."""
  sampler = _sampler(ctx.config, trained)
  return lambda index: trained.mask(index, sampler)


def _sampler(config, trained: Trained) -> samplers.Sampler:
  multiple = targets.channel_multiple(config, trained.space.template)
  return samplers.from_config(config.search, multiple)


def _where(ctx: context_lib.Context) -> tuple:
  return ctx.workdir, ctx.writes


def test_and_export(
  ctx: context_lib.Context, trained: Trained, ranking: Ranking, outputs: outputs_lib.Outputs
) -> dict:
  """The winner's and the full super-network's test accuracy (the test split is touched
  here, once the choice is made), its pruned weights and its compact network; arch.json's
  fields."""
  config, space = ctx.config, trained.space
  test = _test_batches(ctx)
  test_acc, _ = ranking.scorer.architecture(ranking.variables, ranking.mask, test)
  full_test, _ = ranking.scorer.network(trained.state.variables, test)
  pruned = export.pruned_variables(ranking.variables, space, ranking.mask)
  outputs.winner_weights(pruned)
  _obey_stop(ctx, 'testing the winner')  # its compact network and latency take longer
  arch = {
    'index': ranking.winner['index'],
    **export.describe(space, ranking.mask, pruned),
    'val_acc': ranking.winner['val_acc'],
    'test_acc': test_acc,
    'supernet': {
      'val_acc': ranking.supernet['val_acc'],
      'test_acc': float(full_test),
      'params': ranking.supernet['params'],
      'flops': ranking.supernet['flops'],
    },
    'budget': ranking.budget.as_dict(),
  }
  if 'latency_ms' in ranking.supernet:
    arch['supernet']['latency_ms'] = ranking.supernet['latency_ms']
  compact = outputs.compact(
    ctx.model, ranking.variables, ranking.mask, ctx.dataset.image_shape, config.export.latency
  )
  if compact:
    arch.update(input_slice_params=arch['params'], input_slice_flops=arch['flops'], **compact)
  if ctx.latency is not None:
    arch['predicted_latency_ms'] = ranking.winner['latency_ms']
    if config.export.latency and ctx.writes:  # the table checked where a user sees it
      front = pareto.front(ranking.records, 'latency_ms')
      arch['latency_front'] = latency_table.measured_on_front(
        front, _predictor(ctx, trained), _mask_of(ctx, trained)
      )
  return arch


def _test_batches(ctx: context_lib.Context):
  return data_lib.device_batches(
    ctx.dataset.test, ctx.dataset, ctx.config.search.eval_batch_size, ctx.mesh
  )


def finetune_winner(
  ctx: context_lib.Context, trained: Trained, ranking: Ranking, outputs: outputs_lib.Outputs
) -> dict:
  """Fine-tunes the winner, saves its pruned weights beside the un-tuned ones and returns
  its steps and accuracies on the validation and test splits."""
  tuner = finetune.Finetuner(ctx.model, ctx.config, ctx.dataset, trained.space, ctx.mesh)
  tuned = tuner.tune(trained.state, ranking.mask, ctx.guard)
  test = _test_batches(ctx)
  val_acc, test_acc = (
    ranking.scorer.architecture(tuned, ranking.mask, batches)[0]
    for batches in (ranking.validation, test)
  )
  outputs.winner_weights(
    export.pruned_variables(tuned, trained.space, ranking.mask), finetuned=True
  )
  logging.info(
    'winner fine-tuned %d steps: val acc %.4f, test acc %.4f', tuner.steps, val_acc, test_acc
  )
  return {'steps': tuner.steps, 'val_acc': val_acc, 'test_acc': test_acc}


def search_network(
  module,
  data: data_lib.Source | None,
  config: ml_collections.ConfigDict,
  workdir: str,
  start_over: bool = False,
) -> Result:
  """The main job from Python on your own ``module`` (a flax.linen module with
  ``SearchableConv`` layers, or ``from_nnx(Class, **kwargs)`` for an NNX network; None: the
  one the config names) and ``data`` (a data source such
  as ``pgnas_jax.from_arrays(...)``; None: the config's ``data``), into ``workdir`` as the
  command line writes it. ``config`` is not changed: the run's config.json records the module
  as ``model.family='custom'`` with its class and the fields that differ from their defaults,
  so that the run resumes, and ``python -m pgnas_jax.export`` rebuilds the module."""
  config = copy.deepcopy(config)
  if module is not None:
    config_lib.validate(config)  # before the data is read
    if data is None:
      data = data_lib.load(config.data)
    named = (
      config.model.family == 'custom'
      and custom.build(config.model.custom, data.num_classes) == module
    )
    if not named:
      config.model.family = 'custom'
      config.model.custom.module, config.model.custom.kwargs = custom.describe(
        module, data.num_classes
      )
  return run(config, workdir, start_over, model=module, dataset=data)
