"""The main job: config + workdir -> train the super-network -> rank candidates sampled from
the learned posterior -> export the winner -> report.

    python -m pgnas_jax.main --workdir=DIR [--config=configs/FILE.py] [--config.FIELD=VALUE]

Without --config it runs the embedded default (``pgnas_jax/config.py``).
"""
import copy
import json
import os
import shutil
import time

import jax
import ml_collections
from absl import app, flags, logging
from flax import traverse_util

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import cli as cli_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import compact, errors, export, finetune, metric_writers, parallel, report
from pgnas_jax import search, supernets, train
from pgnas_jax import masks as masks_lib
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.compact import candidate
from pgnas_jax.supernets import custom

# Fields that may change between a run and its resumption: they do not change any result.
RESUMABLE_CHANGES = ('train.log_every_steps', 'checkpoint.every_steps', 'checkpoint.max_to_keep',
                     'log.tensorboard', 'log.profile_steps')


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir holding a run may only be resumed with the config that started it."""
  before = traverse_util.flatten_dict(
      workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.CONFIG)), sep='.')
  as_saved = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the file
  now = traverse_util.flatten_dict(as_saved, sep='.')
  changed = [k for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
  if changed:
    shown = ', '.join(f'{k}: {before.get(k)!r} in the workdir, {now.get(k)!r} now'
                      for k in changed[:3])
    raise errors.IncompatibleWorkdirError(
        f'--workdir={workdir} holds a run made with another config ({shown}); nothing was '
        f'changed. Rerun with its config to resume it, choose a new --workdir, or add '
        f'--start_over to delete its outputs and start again')


def _start_over(workdir: str) -> None:
  for name in workdir_lib.OUTPUTS:
    path = workdir_lib.path(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def run(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False,
        model=None, dataset: data_lib.Source | None = None) -> dict:
  """Runs the whole job, or resumes it where it stopped when the workdir holds it; returns
  the winner's description (also in search/arch.json). ``model`` and ``dataset`` replace
  those the config names (``search_network``)."""
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  config_lib.validate_for_devices(config, mesh.devices.size)
  resuming = os.path.exists(workdir_lib.path(workdir, workdir_lib.CONFIG)) and not start_over
  if resuming:
    _check_resumable(workdir, config)
    if os.path.exists(workdir_lib.path(workdir, workdir_lib.REPORT)):
      logging.info('%s holds a finished run (%s); nothing to do', workdir, workdir_lib.REPORT)
      return workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.ARCH))
  if dataset is None:
    dataset = data_lib.load(config.data)  # before touching the workdir: it may be missing
  if model is None:
    model = supernets.build(config.model, dataset.num_classes)
  if config.model.family == 'custom':  # a user's module is checked before the workdir too
    custom.check(model, dataset.image_shape, dataset.num_classes)
  # With several processes the workdir is shared: every process has read it above before
  # process 0 changes it, and none goes on before it is ready.
  parallel.barrier('workdir checked')
  if parallel.is_main_process():
    if start_over:
      _start_over(workdir)
    os.makedirs(workdir_lib.path(workdir, workdir_lib.SEARCH), exist_ok=True)
    os.makedirs(workdir_lib.path(workdir, workdir_lib.PLOTS), exist_ok=True)
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.CONFIG), config.to_dict())
  parallel.barrier('workdir ready')
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    with checkpoint_lib.PreemptionGuard() as guard:
      return _train_search_report(config, workdir, mesh, dataset, model, checkpointer, guard)
  finally:
    checkpointer.close()


def _train_search_report(config, workdir, mesh, dataset, model, checkpointer, guard) -> dict:
  timings = {}
  t = time.time()
  state, space = train.train(model, config, dataset, workdir, mesh, checkpointer, guard)
  timings['train'] = time.time() - t
  out = lambda name: workdir_lib.path(workdir, name)
  p = [float(x) for x in
       jax.tree.leaves(jax.device_get(masks_lib.drop_probabilities(state.drop_logits)))]
  posterior = report.posterior_table(space_lib.group_names(space),
                                     masks_lib.channel_counts(space.template), p)
  writer = parallel.is_main_process()  # every process computes, process 0 writes
  if writer:
    workdir_lib.write_json(out(workdir_lib.POSTERIOR), posterior)

  t = time.time()
  eval_batch = config.search.eval_batch_size
  scorer = search.Scorer(model, mesh, config.model.compute_dtype)
  validation = data_lib.replicated_batches(dataset.validation, dataset, eval_batch, mesh)
  full_val, _ = scorer.network(state.variables, validation)
  with metric_writers.for_search(workdir, config.log) as search_writer:
    records = search.rank_candidates(scorer, state, space, validation, config.search,
                                     out(workdir_lib.CANDIDATES), guard, search_writer)
  winner = search.choose_winner(records)
  winner_mask = search.candidate_mask(state.key('search'), winner['index'], state.drop_logits,
                                      space.template)
  timings['search'] = time.time() - t

  t = time.time()
  # The test split is touched here, once the choice is made.
  test = data_lib.device_batches(dataset.test, dataset, eval_batch, mesh)
  test_acc, _ = scorer.architecture(state.variables, winner_mask, test)
  full_test, _ = scorer.network(state.variables, test)
  pruned = export.pruned_variables(state.variables, space, winner_mask)
  if writer:
    export.save_weights(out(workdir_lib.WINNER_WEIGHTS), pruned)
  full_params, full_flops = space_lib.costs(space, space.template)
  arch = {'index': winner['index'], **export.describe(space, winner_mask, pruned),
          'val_acc': winner['val_acc'], 'test_acc': test_acc,
          'supernet': {'val_acc': float(full_val), 'test_acc': float(full_test),
                       'params': int(full_params), 'flops': int(full_flops)}}
  if writer and not compact.supports(model):
    logging.info('no compact network for a custom module: search/winner_weights.msgpack holds '
                 "the winner's input-sliced pruned weights (docs/library.md)")
  elif writer:  # the network to deploy: search/winner_compact.*, its counts and latency
    arch.update(input_slice_params=arch['params'], input_slice_flops=arch['flops'],
                **candidate.deploy(model, state.variables, winner_mask, dataset.image_shape,
                                   out(workdir_lib.SEARCH), 'winner_compact'))
  timings['test and export'] = time.time() - t
  if config.finetune.steps > 0:
    t = time.time()
    tuner = finetune.Finetuner(model, config, dataset, space, mesh)
    arch['finetuned'] = _finetune_winner(tuner, scorer, state, winner_mask, (validation, test),
                                         out(workdir_lib.WINNER_FINETUNED_WEIGHTS))
    timings['fine-tune'] = time.time() - t
  if writer:
    workdir_lib.write_json(out(workdir_lib.ARCH), arch)

  if writer:
    with open(out(workdir_lib.METRICS)) as f:
      metrics = [json.loads(line) for line in f]
    report.plot_posterior(posterior, out(workdir_lib.POSTERIOR_PLOT))
    report.plot_candidates([r['val_acc'] for r in records], float(full_val), winner['val_acc'],
                           out(workdir_lib.CANDIDATES_PLOT))
    report.plot_training(metrics, out(workdir_lib.TRAINING_PLOT))
    workdir_lib.write_json(out(workdir_lib.TIMINGS), timings)
    # written last: its presence marks the run finished
    report.write_markdown(out(workdir_lib.REPORT), arch, timings,
                          config.search.num_candidates, posterior)
  logging.info('winner #%d: val acc %.4f, test acc %.4f, %d params (full super-network: '
               'val %.4f, test %.4f, %d params)', arch['index'], arch['val_acc'], test_acc,
               arch['params'], full_val, full_test, full_params)
  return arch


def search_network(module, data: data_lib.Source | None, config: ml_collections.ConfigDict,
                   workdir: str, start_over: bool = False) -> dict:
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
    named = config.model.family == 'custom' and custom.build(config.model.custom,
                                                             data.num_classes) == module
    if not named:
      config.model.family = 'custom'
      config.model.custom.module, config.model.custom.kwargs = custom.describe(
          module, data.num_classes)
  return run(config, workdir, start_over, model=module, dataset=data)


def _finetune_winner(tuner: finetune.Finetuner, scorer: search.Scorer, state: train.TrainState,
                     mask, splits: tuple, weights_path: str) -> dict:
  """Fine-tunes the winner (``finetune.steps`` > 0), saves its pruned weights beside the
  un-tuned ones and returns its accuracies on the (validation, test) ``splits``."""
  tuned = tuner.tune(state, mask)
  val_acc, test_acc = (scorer.architecture(tuned, mask, batches)[0] for batches in splits)
  if parallel.is_main_process():
    export.save_weights(weights_path, export.pruned_variables(tuned, tuner.space, mask))
  logging.info('winner fine-tuned %d steps: val acc %.4f, test acc %.4f', tuner.steps,
               val_acc, test_acc)
  return {'steps': tuner.steps, 'val_acc': val_acc, 'test_acc': test_acc}


def cli():
  """Defines the flags and runs the job."""
  config_flag = cli_lib.define_config_flag(os.path.join(os.path.dirname(__file__), 'config.py'))
  workdir_flag = flags.DEFINE_string('workdir', None,
                                     'Directory for every output of the run.')
  start_over_flag = flags.DEFINE_bool(
      'start_over', False, 'Delete the outputs of an earlier run in --workdir (checkpoints '
      'included) and start again; without it, a workdir holding a run is resumed.')
  distributed_flag = flags.DEFINE_bool(
      'distributed', False, 'Run as one of several processes (jax.distributed), reading the '
      'coordinator, process count and index from the cluster (Cloud TPU pod, SLURM); implied '
      'by --coordinator_address, --num_processes and --process_id, which give them instead.')
  coordinator_flag = flags.DEFINE_string(
      'coordinator_address', None, 'HOST:PORT of process 0, reachable by every process.')
  num_processes_flag = flags.DEFINE_integer('num_processes', None,
                                            'Number of processes in the run.')
  process_id_flag = flags.DEFINE_integer('process_id', None,
                                         'Index of this process, 0 .. num_processes - 1.')

  def job(config):
    parallel.initialize_distributed(distributed_flag.value, coordinator_flag.value,
                                    num_processes_flag.value, process_id_flag.value)
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
