"""The main job: config + workdir -> train the super-network -> rank candidates sampled from
the learned posterior -> export the winner -> report.

    python -m pgnas_jax.main --workdir=DIR [--config=configs/FILE.py] [--config.FIELD=VALUE]

Without --config it runs the embedded default (``pgnas_jax/config.py``).
"""

import copy
import errno
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import cli as cli_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import compact, errors, export, finetune, metric_writers, parallel, pareto
from pgnas_jax import report, samplers, search, supernets, train
from pgnas_jax import budget as budget_lib
from pgnas_jax import host_devices
from pgnas_jax import lock as lock_lib
from pgnas_jax import resume
from pgnas_jax import masks as masks_lib
from pgnas_jax import records as records_lib
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.compact import candidate
from pgnas_jax.supernets import custom


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  start_over: bool = False,
  model=None,
  dataset: data_lib.Source | None = None,
) -> dict:
  """Runs the whole job, or resumes it where it stopped when the workdir holds it; returns
  the winner's description (also in search/arch.json). ``model`` and ``dataset`` replace
  those the config names (``search_network``). The job holds the workdir's lock
  (``lock.py``) from before it reads the workdir to the end."""
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  config_lib.validate_for_devices(config, mesh.devices.size)
  with lock_lib.WorkdirLock(workdir) as held:
    return _run_locked(config, workdir, mesh, start_over, held, model, dataset)


def _run_locked(
  config, workdir: str, mesh, start_over: bool, held: lock_lib.WorkdirLock, model, dataset
) -> dict:
  plan = resume.plan(workdir, config, start_over)
  if plan == 'finished':
    logging.info('%s holds a finished run (%s); nothing to do', workdir, workdir_lib.REPORT)
    return workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.ARCH))
  if plan == 'resume' and start_over:
    logging.info('resuming the run that --start_over began in %s', workdir)
  if dataset is None:
    dataset = data_lib.load(config.data)  # before touching the workdir: it may be missing
  data_lib.check_fits(dataset, config.train)
  train.setup(config, dataset)  # refuses a length that gives no training step
  if model is None:
    model = supernets.build(config.model, dataset.num_classes)
  if config.model.family == 'custom':  # a user's module is checked before the workdir too
    custom.check(model, dataset.image_shape, dataset.num_classes)
  # With several processes the workdir is shared: every process has read it above before
  # process 0 changes it, and none goes on before it is ready.
  parallel.barrier('workdir checked')
  try:
    if parallel.is_main_process():
      held.claim()
      _prepare(workdir, config, fresh_start=plan == 'fresh' and start_over)
    parallel.barrier('workdir ready')
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    try:
      with checkpoint_lib.PreemptionGuard() as guard:
        return _train_search_report(config, workdir, mesh, dataset, model, checkpointer, guard)
    finally:
      checkpointer.close()
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise errors.WorkdirError(
      f'no space left on the device of --workdir={workdir}: this run needs about '
      f'{_space_needed(model, config, dataset) / 2**20:.0f} MB there '
      f'({shutil.disk_usage(workdir).free / 2**20:.0f} MB free now); free some and run the '
      f'same command again to resume'
    ) from None


def _prepare(workdir: str, config, fresh_start: bool) -> None:
  if fresh_start:
    resume.start_over(workdir)
  os.makedirs(workdir_lib.path(workdir, workdir_lib.SEARCH), exist_ok=True)
  os.makedirs(workdir_lib.path(workdir, workdir_lib.PLOTS), exist_ok=True)
  workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.CONFIG), config.to_dict())
  if fresh_start:  # marks the run as --start_over's, see resume.plan
    workdir_lib.write_atomically(workdir_lib.path(workdir, workdir_lib.STARTED_OVER), '')


def _space_needed(model, config, dataset) -> int:
  """Bytes a run's outputs take at most: the kept checkpoints (and the one being written) of
  the train state, the winner's weights (input-sliced, fine-tuned, compact) and a margin for
  the logs, plots and StableHLO."""
  shapes = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0)}, jnp.zeros((1,) + tuple(dataset.image_shape)), train=False
    )
  )
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes['params']))
  state = 2 * weights  # weights + SGD momentum; BatchNorm statistics and logits are small
  return (config.checkpoint.max_to_keep + 1) * state + 3 * weights + 16 * 2**20


def _train_search_report(config, workdir, mesh, dataset, model, checkpointer, guard) -> dict:
  timings = {}
  t = time.time()
  state, space = train.train(model, config, dataset, workdir, mesh, checkpointer, guard)
  timings['train'] = time.time() - t
  out = lambda name: workdir_lib.path(workdir, name)
  p = [
    float(x)
    for x in jax.tree.leaves(jax.device_get(masks_lib.drop_probabilities(state.drop_logits)))
  ]
  posterior = report.posterior_table(
    space_lib.group_names(space), masks_lib.channel_counts(space.template), p
  )
  writer = parallel.is_main_process()  # every process computes, process 0 writes
  if writer:
    workdir_lib.write_json(out(workdir_lib.POSTERIOR), posterior)

  t = time.time()
  eval_batch = config.search.eval_batch_size
  scorer = search.Scorer(model, mesh, config.model.compute_dtype)
  validation = data_lib.replicated_batches(dataset.validation, dataset, eval_batch, mesh)
  full_val, _ = scorer.network(state.variables, validation)
  full_params, full_flops = space_lib.costs(space, space.template)
  budget = budget_lib.Budget.from_config(config.search, full_params, full_flops)
  recalibration = search.recalibration_images(
    dataset, config.search.bn_recalibration_batches, eval_batch, mesh
  )
  with metric_writers.for_search(workdir, config.log) as search_writer:
    records = search.rank_candidates(
      scorer,
      state,
      space,
      validation,
      config.search,
      out(workdir_lib.CANDIDATES),
      guard,
      search_writer,
      budget,
      recalibration,
    )
  records = _mark_fits(records, budget, out(workdir_lib.CANDIDATES))
  unresolved = records_lib.unresolved_ranking(records, config.data.validation_size)
  if unresolved and writer:
    logging.warning('%s', unresolved)
  supernet = {'val_acc': float(full_val), 'params': int(full_params), 'flops': int(full_flops)}
  try:
    winner = search.choose_winner(records, budget)
  except errors.BudgetError:
    if writer:  # the fronts show what a budget can buy
      _write_pareto(records, supernet, None, budget, out)
    raise
  sampler = samplers.from_config(config.search)
  winner_mask = search.candidate_mask(
    state.key('search'), winner['index'], state.drop_logits, space.template, sampler
  )
  # the winner as it was scored: with its re-estimated BatchNorm statistics when they are on
  winner_variables = scorer.recalibrated(state.variables, winner_mask, recalibration)
  timings['search'] = time.time() - t

  t = time.time()
  # The test split is touched here, once the choice is made.
  test = data_lib.device_batches(dataset.test, dataset, eval_batch, mesh)
  test_acc, _ = scorer.architecture(winner_variables, winner_mask, test)
  full_test, _ = scorer.network(state.variables, test)
  pruned = export.pruned_variables(winner_variables, space, winner_mask)
  if writer:
    export.save_weights(out(workdir_lib.WINNER_WEIGHTS), pruned)
  arch = {
    'index': winner['index'],
    **export.describe(space, winner_mask, pruned),
    'val_acc': winner['val_acc'],
    'test_acc': test_acc,
    'supernet': {
      'val_acc': float(full_val),
      'test_acc': float(full_test),
      'params': int(full_params),
      'flops': int(full_flops),
    },
    'budget': budget.as_dict(),
  }
  if writer and not compact.supports(model):
    logging.info(
      'no compact network for a custom module: search/winner_weights.msgpack holds '
      "the winner's input-sliced pruned weights (docs/library.md)"
    )
  elif writer:  # the network to deploy: search/winner_compact.*, its counts and latency
    arch.update(
      input_slice_params=arch['params'],
      input_slice_flops=arch['flops'],
      **candidate.deploy(
        model,
        winner_variables,
        winner_mask,
        dataset.image_shape,
        out(workdir_lib.SEARCH),
        'winner_compact',
        measure=config.export.latency,
      ),
    )
  timings['test and export'] = time.time() - t
  if config.finetune.steps > 0:
    t = time.time()
    tuner = finetune.Finetuner(model, config, dataset, space, mesh)
    arch['finetuned'] = _finetune_winner(
      tuner,
      scorer,
      state,
      winner_mask,
      (validation, test),
      out(workdir_lib.WINNER_FINETUNED_WEIGHTS),
      guard,
    )
    timings['fine-tune'] = time.time() - t
  if writer:
    workdir_lib.write_json(out(workdir_lib.ARCH), arch)

  if writer:
    with open(out(workdir_lib.METRICS)) as f:
      metrics = [json.loads(line) for line in f]
    report.plot_posterior(posterior, out(workdir_lib.POSTERIOR_PLOT))
    report.plot_candidates(
      [r['val_acc'] for r in records],
      float(full_val),
      winner['val_acc'],
      out(workdir_lib.CANDIDATES_PLOT),
    )
    report.plot_training(metrics, out(workdir_lib.TRAINING_PLOT))
    front = _write_pareto(records, supernet, winner['index'], budget, out)
    workdir_lib.write_json(out(workdir_lib.TIMINGS), timings)
    # written last: its presence marks the run finished
    report.write_markdown(
      out(workdir_lib.REPORT),
      arch,
      timings,
      sampler.num_candidates(config.search.num_candidates),
      posterior,
      front,
    )
  logging.info(
    'winner #%d: val acc %.4f, test acc %.4f, %d params (full super-network: '
    'val %.4f, test %.4f, %d params)',
    arch['index'],
    arch['val_acc'],
    test_acc,
    arch['params'],
    full_val,
    full_test,
    full_params,
  )
  return arch


def _mark_fits(records: list, budget: budget_lib.Budget, path: str) -> list:
  """``records`` with ``fits`` for this budget; candidates recorded under another budget (a
  resumed run) get theirs rewritten in the candidates file."""
  marked = budget_lib.mark(records, budget)
  if marked != records and parallel.is_main_process():
    workdir_lib.write_atomically(path, ''.join(records_lib.to_line(r) for r in marked))
  return marked


def _write_pareto(
  records: list, supernet: dict, winner_index, budget: budget_lib.Budget, out
) -> dict:
  front = pareto.summary(records, supernet, winner_index, budget.as_dict())
  workdir_lib.write_json(out(workdir_lib.PARETO), front)
  pareto.plot(records, front, out(workdir_lib.PARETO_PLOT))
  return front


def search_network(
  module,
  data: data_lib.Source | None,
  config: ml_collections.ConfigDict,
  workdir: str,
  start_over: bool = False,
) -> dict:
  """The main job from Python on your own ``module`` (a flax.linen module with
  ``SearchableConv`` layers; None: the one the config names) and ``data`` (a data source such
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


def _finetune_winner(
  tuner: finetune.Finetuner,
  scorer: search.Scorer,
  state: train.TrainState,
  mask,
  splits: tuple,
  weights_path: str,
  guard,
) -> dict:
  """Fine-tunes the winner (``finetune.steps`` > 0), saves its pruned weights beside the
  un-tuned ones and returns its accuracies on the (validation, test) ``splits``."""
  tuned = tuner.tune(state, mask, guard)
  val_acc, test_acc = (scorer.architecture(tuned, mask, batches)[0] for batches in splits)
  if parallel.is_main_process():
    export.save_weights(weights_path, export.pruned_variables(tuned, tuner.space, mask))
  logging.info(
    'winner fine-tuned %d steps: val acc %.4f, test acc %.4f', tuner.steps, val_acc, test_acc
  )
  return {'steps': tuner.steps, 'val_acc': val_acc, 'test_acc': test_acc}


def cli():
  """Defines the flags and runs the job."""
  config_flag = cli_lib.define_config_flag(os.path.join(os.path.dirname(__file__), 'config.py'))
  workdir_flag = flags.DEFINE_string('workdir', None, 'Directory for every output of the run.')
  start_over_flag = flags.DEFINE_bool(
    'start_over',
    False,
    'Delete the outputs of an earlier run in --workdir (checkpoints '
    'included) and start again; without it, a workdir holding a run is resumed.',
  )
  distributed_flag = flags.DEFINE_bool(
    'distributed',
    False,
    'Run as one of several processes (jax.distributed), reading the '
    'coordinator, process count and index from the cluster (Cloud TPU pod, SLURM); implied '
    'by --coordinator_address, --num_processes and --process_id, which give them instead.',
  )
  coordinator_flag = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, reachable by every process.'
  )
  num_processes_flag = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the run.'
  )
  process_id_flag = flags.DEFINE_integer(
    'process_id', None, 'Index of this process, 0 .. num_processes - 1.'
  )
  cpu_devices_flag = flags.DEFINE_string(
    'cpu_devices',
    host_devices.AUTO,
    'XLA devices to split the CPU of each process into: auto (one device per core without '
    'intra-op threads, fewer when the config does not split over them; one in multi-process '
    'runs) or a whole number. Accelerators are not affected.',
  )

  def job(config):
    config_lib.validate(config)  # bad input is answered before anything starts
    several = distributed_flag.value or num_processes_flag.value not in (None, 1)
    # before JAX starts its backends
    host_devices.split_for(cpu_devices_flag.value, config, several_processes=several)
    parallel.initialize_distributed(
      distributed_flag.value,
      coordinator_flag.value,
      num_processes_flag.value,
      process_id_flag.value,
    )
    if not parallel.is_main_process():  # one progress log for the run, process 0's
      logging.set_verbosity(logging.WARNING)
    run(config, workdir_flag.value, start_over_flag.value)

  def main(argv):
    logging.get_absl_handler().addFilter(cli_lib.quiet_libraries)
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    if not workdir_flag.value:
      raise app.UsageError('--workdir is required: the folder where the run writes its outputs')
    cli_lib.exit_on_user_errors(job, cli_lib.read_config(config_flag))

  app.run(main, flags_parser=cli_lib.parse_flags)


if __name__ == '__main__':
  cli()
