"""Deploying a candidate: its compact network's files, counts and latency (``deploy``), and
the same for any candidate of a finished workdir without training or ranking again
(``from_workdir``, behind ``python -m pgnas_jax.export``).

Candidate ``c``'s mask is drawn again from its index, ``fold_in(search_key, c)``, with the
drop logits of the last checkpoint: the mask the search scored (``search.candidate_mask``).
"""

import logging
import os

import jax
import ml_collections
from flax import traverse_util

from pgnas_jax import compact, errors, parallel, samplers, targets, trained
from pgnas_jax import config as config_lib
from pgnas_jax import lock as lock_lib
from pgnas_jax import records as records_lib
from pgnas_jax import data as data_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.compact import files, latency


def deploy(
  model, variables: dict, mask, image_shape: tuple, stem: str, measure: bool = True
) -> dict:
  """Writes the compact network as ``<stem>.npz`` and ``<stem>.stablehlo``; returns
  arch.json's fields for it (counts, files and, if ``measure``, latency)."""
  net = compact.build(model, variables, mask, image_shape)
  out = {
    'compact_params': compact.num_params(net),
    'compact_flops': compact.macs(net),
    'compact_files': files.save(net, *os.path.split(stem)),
  }
  if measure:
    out['latency_ms'] = latency.measure(model, variables, mask, net)
  return out


def _workdir_file(workdir: str, name: str, what: str):
  """The JSON file ``name`` of the run in ``workdir``; a missing or damaged one is refused in
  one line saying what it held and how to get it back."""
  path = workdir_lib.path(workdir, name)
  try:
    return workdir_lib.read_json(path)
  except FileNotFoundError:
    problem = 'is missing'
  except ValueError as e:
    problem = f'is empty or damaged ({type(e).__name__})'
  raise errors.ExportError(
    f'{path} ({what}) {problem}: rerun python -m pgnas_jax.main --workdir={workdir} with the '
    f"run's config to write it again, or restore it from a copy"
  )


def _check_folder(workdir: str) -> None:
  if not os.path.isdir(workdir):
    what = 'is a file, not a folder' if os.path.exists(workdir) else 'does not exist'
    raise errors.ExportError(
      f'--workdir={workdir} {what}; give the folder of a finished run of python -m pgnas_jax.main'
    )


def finished_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the finished run in ``workdir``; anything else is refused in one line."""
  _check_folder(workdir)
  if not os.path.exists(workdir_lib.path(workdir, workdir_lib.REPORT)):
    raise errors.ExportError(
      f'--workdir={workdir} holds no finished run (no report.md); run python -m '
      f'pgnas_jax.main --workdir={workdir} with its config to finish it first'
    )
  saved = _workdir_file(workdir, workdir_lib.CONFIG, 'the config the run was made with')
  if not isinstance(saved, dict):
    raise errors.ExportError(
      f'{workdir_lib.path(workdir, workdir_lib.CONFIG)} holds no config; restore it from a copy'
    )
  # a run made before some fields existed ran with their older_runs values
  nested = traverse_util.unflatten_dict(config_lib.as_run(saved), sep='.')
  return ml_collections.ConfigDict(nested)


def _candidate(workdir: str, index) -> dict:
  """The candidate's line of ``search/candidates.jsonl`` (read as the main job reads it: up
  to a cut or damaged line); None: the winner's."""
  if index is None:
    index = _workdir_file(workdir, workdir_lib.ARCH, "the winner's description")['index']
  records = {
    r['index']: r for r in records_lib.read(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
  }
  if index not in records:
    held = f'candidates 0..{len(records) - 1}' if records else 'it holds no candidate'
    raise errors.ExportError(
      f'--candidate={index} is not in {workdir}/search/candidates.jsonl ({held}); give one of those'
    )
  return records[index]


def from_workdir(workdir: str, index=None, measure: bool = True) -> dict:
  """Exports candidate ``index`` (None: the winner) of a finished run as
  ``search/candidate<index>_compact.{npz,stablehlo,json}``, holding the workdir's lock as
  the main job does; returns the description."""
  _check_folder(workdir)  # before the lock, which would make a missing one
  with lock_lib.WorkdirLock(workdir) as held:  # a run at work there is named as such
    held.claim()
    return _export(workdir, index, measure)


def _export(workdir: str, index, measure: bool) -> dict:
  config = finished_config(workdir)
  record = _candidate(workdir, index)
  dataset = data_lib.load(config.data)
  run = trained.restore(workdir, config, dataset, parallel.make_mesh(jax.devices()[:1]))
  multiple = targets.channel_multiple(config, run.space.template)
  mask = run.mask(record['index'], samplers.from_config(config.search, multiple))
  name = f'candidate{record["index"]}_compact'
  folder = workdir_lib.path(workdir, workdir_lib.SEARCH)
  variables = jax.device_get(run.state.variables)
  try:
    deployed = deploy(
      run.model, variables, mask, dataset.image_shape, os.path.join(folder, name), measure
    )
  except compact.Unsupported as e:
    raise errors.ExportError(
      f"{workdir}: no compact network ({e}); the winner's input-sliced pruned weights are in "
      f'search/winner_weights.msgpack'
    ) from None
  described = {
    'index': record['index'],
    'val_acc': record['val_acc'],
    'input_slice_params': record['params'],
    'input_slice_flops': record['flops'],
    **deployed,
  }
  workdir_lib.write_json(os.path.join(folder, name + '.json'), described)
  logging.info('candidate %d exported to %s', record['index'], folder)
  return described
