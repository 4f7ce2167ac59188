"""The main job: config + workdir -> train the super-network -> rank candidates sampled from
the learned posterior -> export the winner -> report.

    python -m pgnas_jax.main --workdir=DIR [--config=configs/FILE.py] [--config.FIELD=VALUE]

Without --config it runs the embedded default (``pgnas_jax/config.py``).
"""
import json
import logging as py_logging
import os
import shutil
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, export, finetune, parallel, report, search, supernets, train
from pgnas_jax import masks as masks_lib
from pgnas_jax import space as space_lib
from pgnas_jax.compact import candidate


OUTPUTS = ('config.json', 'metrics.jsonl', 'posterior.json', 'timings.json', 'report.md',
           'search', 'plots', checkpoint_lib.DIRNAME, checkpoint_lib.UNREADABLE_DIRNAME)
# Fields that may change between a run and its resumption: they do not change any result.
RESUMABLE_CHANGES = ('train.log_every_steps', 'checkpoint.every_steps', 'checkpoint.max_to_keep')


def _check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir holding a run may only be resumed with the config that started it."""
  with open(os.path.join(workdir, 'config.json')) as f:
    before = traverse_util.flatten_dict(json.load(f), sep='.')
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
  for name in OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def run(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> dict:
  """Runs the whole job, or resumes it where it stopped when the workdir holds it; returns
  the winner's description (also in search/arch.json)."""
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  config_lib.validate_for_devices(config, mesh.devices.size)
  resuming = os.path.exists(os.path.join(workdir, 'config.json')) and not start_over
  if resuming:
    _check_resumable(workdir, config)
    if os.path.exists(os.path.join(workdir, 'report.md')):
      logging.info('%s holds a finished run (report.md); nothing to do', workdir)
      with open(os.path.join(workdir, 'search', 'arch.json')) as f:
        return json.load(f)
  dataset = data_lib.load(config.data)  # before touching the workdir: it may be missing
  # With several processes the workdir is shared: every process has read it above before
  # process 0 changes it, and none goes on before it is ready.
  parallel.barrier('workdir checked')
  if parallel.is_main_process():
    if start_over:
      _start_over(workdir)
    os.makedirs(os.path.join(workdir, 'search'), exist_ok=True)
    os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
    report.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  parallel.barrier('workdir ready')
  model = supernets.build(config.model, dataset.num_classes)
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
  variables = {'params': state.params['weights'], 'batch_stats': state.batch_stats}
  drop_logits = state.params['drop_logits']
  p = [float(x) for x in jax.tree.leaves(jax.device_get(masks_lib.drop_probabilities(drop_logits)))]
  sizes = [int(m.shape[-1]) for m in jax.tree.leaves(space.template)]
  posterior = report.posterior_table(space_lib.group_names(space), sizes, p)
  writer = parallel.is_main_process()  # every process computes, process 0 writes
  if writer:
    report.write_json(os.path.join(workdir, 'posterior.json'), posterior)

  t = time.time()
  eval_batch = config.search.eval_batch_size
  full_scorer = search.make_full_scorer(model, mesh, config.model.compute_dtype)
  validation = search.replicated_batches(dataset.validation, dataset, eval_batch, mesh)
  full_val, _ = search.evaluate(full_scorer, (variables,), validation)
  search_key = train.purpose_key(state.root_key, 'search')
  records = search.rank_candidates(model, variables, drop_logits, space, search_key, validation,
                                   config.search, config.model.compute_dtype,
                                   os.path.join(workdir, 'search', 'candidates.jsonl'), mesh,
                                   guard)
  winner = search.choose_winner(records)
  winner_mask = search.candidate_mask(search_key, winner['index'], drop_logits, space.template)
  timings['search'] = time.time() - t

  t = time.time()
  # The test split is touched here, once the choice is made.
  test = search.device_batches(dataset.test, dataset, eval_batch, mesh)
  test_acc, _ = search.evaluate_mask(model, variables, winner_mask, test, mesh,
                                     config.model.compute_dtype)
  full_test, _ = search.evaluate(full_scorer, (variables,), test)
  pruned = export.pruned_variables(variables, space, winner_mask)
  if writer:
    export.save_weights(os.path.join(workdir, 'search', 'winner_weights.msgpack'), pruned)
  full_params, full_flops = space_lib.costs(space, space.template)
  arch = {'index': winner['index'], **export.describe(space, winner_mask, pruned),
          'val_acc': winner['val_acc'], 'test_acc': test_acc,
          'supernet': {'val_acc': float(full_val), 'test_acc': float(full_test),
                       'params': int(full_params), 'flops': int(full_flops)}}
  if writer:  # the network to deploy: search/winner_compact.*, its counts and latency
    arch.update(input_slice_params=arch['params'], input_slice_flops=arch['flops'],
                **candidate.deploy(model, variables, winner_mask, data_lib.image_shape(dataset),
                                   os.path.join(workdir, 'search'), 'winner_compact'))
  timings['test and export'] = time.time() - t
  if config.finetune.steps > 0:
    t = time.time()
    arch['finetuned'] = _finetune_winner(config, workdir, mesh, dataset, model, space, state,
                                         variables, winner_mask, validation, test)
    timings['fine-tune'] = time.time() - t
  if writer:
    report.write_json(os.path.join(workdir, 'search', 'arch.json'), arch)

  if writer:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      metrics = [json.loads(line) for line in f]
    report.plot_posterior(posterior, os.path.join(workdir, 'plots', 'drop_probabilities.png'))
    report.plot_candidates([r['val_acc'] for r in records], float(full_val), winner['val_acc'],
                           os.path.join(workdir, 'plots', 'candidate_val_accuracy.png'))
    report.plot_training(metrics, os.path.join(workdir, 'plots', 'training.png'))
    report.write_json(os.path.join(workdir, 'timings.json'), timings)
    # written last: its presence marks the run finished
    report.write_markdown(os.path.join(workdir, 'report.md'), arch, timings,
                          config.search.num_candidates, posterior)
  logging.info('winner #%d: val acc %.4f, test acc %.4f, %d params (full super-network: '
               'val %.4f, test %.4f, %d params)', arch['index'], arch['val_acc'], test_acc,
               arch['params'], full_val, full_test, full_params)
  return arch


def _finetune_winner(config, workdir, mesh, dataset, model, space, state, variables, mask,
                     validation, test) -> dict:
  """Fine-tunes the winner (``finetune.steps`` > 0), saves its pruned weights beside the
  un-tuned ones and returns its accuracies."""
  tuner = finetune.Finetuner(model, config, dataset, space, mesh)
  tuned = tuner(variables, mask, state.params['drop_logits'],
                train.purpose_key(state.root_key, 'finetune'), int(state.step))
  dtype = config.model.compute_dtype
  val_acc, _ = search.evaluate_mask(model, tuned, mask, validation, mesh, dtype)
  test_acc, _ = search.evaluate_mask(model, tuned, mask, test, mesh, dtype)
  if parallel.is_main_process():
    export.save_weights(os.path.join(workdir, 'search', 'winner_finetuned_weights.msgpack'),
                        export.pruned_variables(tuned, space, mask))
  logging.info('winner fine-tuned %d steps: val acc %.4f, test acc %.4f', config.finetune.steps,
               val_acc, test_acc)
  return {'steps': config.finetune.steps, 'val_acc': val_acc, 'test_acc': test_acc}


def fail(message: str, status: int = 2):
  print(f'pgnas_jax: {message}', file=sys.stderr)
  sys.exit(status)


_FIELDS_HELP = 'fields are listed in README.md, "Config fields"'


def one_line(e: Exception) -> str:
  """An exception's text on one line, without the quoting that KeyError adds."""
  text = str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  return ' '.join(text.replace('\\n', ' ').replace("\\'", "'").split())


def quiet_libraries(record) -> bool:
  """Keeps orbax's many INFO lines about its threads out of the progress log."""
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{one_line(e)}; {_FIELDS_HELP}')


def cli():
  """Defines the flags and runs the job. ml_collections applies ``--config.FIELD`` overrides
  while the flag is defined, so an unknown field surfaces here, not in flag parsing."""
  try:
    config_flag = config_flags.DEFINE_config_file(
        'config', os.path.join(os.path.dirname(__file__), 'config.py'),
        'Config file (a Python file with get_config()); fields can be overridden with '
        '--config.FIELD=VALUE.', lock_config=True)
  except (AttributeError, KeyError) as e:
    fail(f'unknown config field on the command line: {one_line(e)}; {_FIELDS_HELP}')
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

  def main(argv):
    logging.get_absl_handler().addFilter(quiet_libraries)
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    if not workdir_flag.value:
      raise app.UsageError('--workdir is required: the folder where the run writes its outputs')
    try:
      config = config_flag.value
      config.to_dict()  # a config file that failed to load raises only when first used
    except (OSError, AttributeError, KeyError) as e:
      fail(f'cannot load the config: {one_line(e)}')
    try:
      parallel.initialize_distributed(distributed_flag.value, coordinator_flag.value,
                                      num_processes_flag.value, process_id_flag.value)
      if not parallel.is_main_process():  # one progress log for the run, process 0's
        logging.set_verbosity(logging.WARNING)
      run(config, workdir_flag.value, start_over_flag.value)
    except errors.Preempted as e:
      fail(one_line(e), status=143)
    except errors.UserFacingError as e:
      fail(one_line(e))

  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
