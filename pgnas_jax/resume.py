"""Whether and how a run continues from its workdir: finished (nothing to do), resumed
(from its checkpoints and recorded candidates, choosing or scoring again where a field that
allows it changed), or begun afresh (``--start_over``, or an empty workdir). What resuming
with another value of a field does is the field's own ``on_resume`` (``config.fields()``), and
the value an older run without a field had is its ``older_runs``."""

import json
import os
import shutil

import ml_collections
from absl import logging
from flax import traverse_util

from pgnas_jax import cli as cli_lib
from pgnas_jax import config as config_lib
from pgnas_jax import budget as budget_lib
from pgnas_jax import errors, parallel, samplers, targets
from pgnas_jax import records as records_lib
from pgnas_jax import workdir as workdir_lib


def saved_config(workdir: str) -> dict:
  """The config.json of the run in ``workdir``; a damaged one is refused in one line."""
  path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  try:
    saved = workdir_lib.read_json(path)
  except ValueError as e:
    raise errors.WorkdirError(
      f'{path} is empty or damaged ({type(e).__name__}: {cli_lib.one_line(e)}), so the run '
      f'in --workdir={workdir} cannot be checked against this config; restore it, or add '
      f"--start_over to delete the run's outputs and start again"
    ) from None
  if not isinstance(saved, dict):
    raise errors.WorkdirError(
      f'{path} holds no config (a JSON {type(saved).__name__}), so the run in '
      f'--workdir={workdir} cannot be checked against this config; restore it, or add '
      f"--start_over to delete the run's outputs and start again"
    )
  return saved


def _as_run(workdir: str) -> dict:
  """The flat config the run in ``workdir`` ran with: its config.json, and for each field
  added since it was made, the value a run without it had."""
  return config_lib.as_run(saved_config(workdir))


def _as_saved(config: ml_collections.ConfigDict) -> dict:
  """``config`` flat, its values as config.json holds them (lists, nulls)."""
  return traverse_util.flatten_dict(json.loads(workdir_lib.to_json(config.to_dict())), sep='.')


def _changed(before: dict, now: dict, on_resume: str) -> list[str]:
  """The fields of kind ``on_resume`` (``REFUSED``: also keys no field declares) whose value
  differs between the flat configs ``before`` and ``now``."""
  kinds = {f.name: f.on_resume for f in config_lib.fields()}
  return [
    k
    for k in sorted(set(before) | set(now))
    if before.get(k) != now.get(k) and kinds.get(k, config_lib.REFUSED) == on_resume
  ]


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir holding a run may only be resumed with the config that started it, but for
  fields that change no result or that the run can redo (``Field.on_resume``)."""
  before, now = _as_run(workdir), _as_saved(config)
  changed = _changed(before, now, config_lib.REFUSED)
  if changed:
    shown = ', '.join(
      f'{k}: {before.get(k)!r} in the workdir, {now.get(k)!r} now' for k in changed[:3]
    )
    raise errors.IncompatibleWorkdirError(
      f'--workdir={workdir} holds a run made with another config ({shown}); nothing was '
      f'changed. Rerun with its config to resume it, choose a new --workdir, or add '
      f'--start_over to delete its outputs and start again'
    )


def _budget_changed(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether a run is resumed with another budget: it then chooses again among its scored
  candidates (the ``RECHOOSE`` fields)."""
  return bool(_changed(_as_run(workdir), _as_saved(config), config_lib.RECHOOSE))


def sampler_changed(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether a run is resumed with another candidate sampler (the ``RESCORE`` fields, as
  ``samplers.from_config`` reads them): it then scores its candidates again."""
  before = traverse_util.unflatten_dict(_as_run(workdir), sep='.')
  return _sampler(ml_collections.ConfigDict(before)) != _sampler(config)


def _sampler(config: ml_collections.ConfigDict) -> samplers.Sampler:
  """The sampler as the config writes it, ``search.channel_multiple='auto'`` read as 1 where
  no target is set (``targets.requested_multiple``; with one, 'auto' stays: a target cannot
  change on resume, nor the network's widths)."""
  return samplers.from_config(config.search, targets.requested_multiple(config))


def start_over(workdir: str) -> None:
  """Deletes an earlier run's outputs, config.json last: a kill part way never leaves
  checkpoints or candidates without the config that made them."""
  for name in sorted(workdir_lib.OUTPUTS, key=lambda name: name == workdir_lib.CONFIG):
    path = workdir_lib.path(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _refuse_a_budget_nothing_fits(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A finished run chosen again under a budget none of its candidates fits keeps its report:
  the refusal comes before anything changes (``budget.fitting``'s message)."""
  try:
    supernet = workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.PARETO))['supernet']
    recorded = records_lib.read(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
  except (OSError, ValueError, KeyError, TypeError):
    return  # the run chooses again from what it can read, as without this check
  if recorded:
    limits = budget_lib.Budget.from_config(config, supernet['params'], supernet['flops'])
    budget_lib.fitting(recorded, limits)


def plan(workdir: str, config: ml_collections.ConfigDict, start_over: bool) -> str:
  """What to do with the workdir: 'finished' (nothing to do), 'resume', or 'fresh' (after
  deleting an earlier run's outputs when ``start_over``). Refuses, touching nothing, a
  workdir whose state the run cannot continue from, naming what to remove."""
  if not os.path.exists(workdir_lib.path(workdir, workdir_lib.CONFIG)):
    left = [
      name
      for name in workdir_lib.OUTPUTS
      if name != workdir_lib.METRICS and os.path.exists(workdir_lib.path(workdir, name))
    ]
    if left and not start_over:
      raise errors.WorkdirError(
        f'--workdir={workdir} holds outputs of a run ({", ".join(left)}) but no '
        f'{workdir_lib.CONFIG}, so the config that made them is unknown; remove '
        f'{workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)} to train again with this '
        f'config (the other outputs are made again), or add --start_over'
      )
    return 'fresh'
  finished = os.path.exists(workdir_lib.path(workdir, workdir_lib.REPORT))
  if start_over:
    # a --start_over run that was stopped resumes when the same command runs again
    began_it = os.path.exists(workdir_lib.path(workdir, workdir_lib.STARTED_OVER))
    if finished or not began_it or not _resumable_with(workdir, config):
      return 'fresh'
  check_resumable(workdir, config)
  if not finished:
    return 'resume'
  rescore = sampler_changed(workdir, config)
  if rescore or _budget_changed(workdir, config):
    # a finished run resumed with another budget or sampler is not finished: its report (the
    # finished mark) goes, and the run chooses again from its checkpoint and its recorded
    # candidates, which another sampler's run id makes it score again (records.resume)
    logging.info(
      'the %s changed: %s',
      'sampler' if rescore else 'budget',
      'scoring the candidates again, keeping the training'
      if rescore
      else 'choosing the winner again among the scored candidates',
    )
    if not rescore:
      _refuse_a_budget_nothing_fits(workdir, config)
    parallel.barrier('report seen')  # by every process, before process 0 removes it
    if parallel.is_main_process():
      os.remove(workdir_lib.path(workdir, workdir_lib.REPORT))
      if rescore:  # the other sampler's candidates: the search would cut them as foreign
        workdir_lib.write_atomically(workdir_lib.path(workdir, workdir_lib.CANDIDATES), b'')
    return 'resume'
  missing = [
    name
    for name in workdir_lib.FINISHED_OUTPUTS
    if not os.path.exists(workdir_lib.path(workdir, name))
  ]
  if not missing:
    return 'finished'
  logging.warning(
    '%s holds a finished run without %s: finishing it again from its checkpoints',
    workdir,
    ', '.join(missing),
  )
  return 'resume'


def _resumable_with(workdir: str, config: ml_collections.ConfigDict) -> bool:
  try:
    check_resumable(workdir, config)
  except errors.UserFacingError:
    return False
  return True
