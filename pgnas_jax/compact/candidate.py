"""Deploying a candidate: its compact network's files, counts and latency (``deploy``), and
the same for any candidate of a finished workdir without training or ranking again
(``from_workdir``, behind ``python -m pgnas_jax.export``).

Candidate ``c``'s mask is drawn again from its index, ``fold_in(search_key, c)``, with the
drop logits of the last checkpoint: the mask the search scored (``search.candidate_mask``).
"""

import json
import logging
import os

import jax
import ml_collections

from pgnas_jax import compact, errors, parallel, samplers, trained
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


def _read_json_lines(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def finished_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the finished run in ``workdir``; anything else is refused in one line."""
  if not os.path.isdir(workdir):
    raise errors.ExportError(
      f'--workdir={workdir} does not exist; give the folder of a '
      f'finished run of python -m pgnas_jax.main'
    )
  if not os.path.exists(workdir_lib.path(workdir, workdir_lib.REPORT)):
    raise errors.ExportError(
      f'--workdir={workdir} holds no finished run (no report.md); run python -m '
      f'pgnas_jax.main --workdir={workdir} with its config to finish it first'
    )
  return ml_collections.ConfigDict(
    workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.CONFIG))
  )


def _candidate(workdir: str, index) -> dict:
  """The candidate's line of ``search/candidates.jsonl``; None: the winner's."""
  if index is None:
    index = workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.ARCH))['index']
  records = {
    r['index']: r for r in _read_json_lines(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
  }
  if index not in records:
    raise errors.ExportError(
      f'--candidate={index} is not in {workdir}/search/candidates.jsonl (candidates '
      f'0..{len(records) - 1}); give one of those'
    )
  return records[index]


def from_workdir(workdir: str, index=None, measure: bool = True) -> dict:
  """Exports candidate ``index`` (None: the winner) of a finished run as
  ``search/candidate<index>_compact.{npz,stablehlo,json}``; returns the description."""
  config = finished_config(workdir)
  record = _candidate(workdir, index)
  dataset = data_lib.load(config.data)
  run = trained.restore(workdir, config, dataset, parallel.make_mesh(jax.devices()[:1]))
  if not compact.supports(run.model):
    raise errors.ExportError(
      f'{workdir} searched a custom module ({config.model.custom.module}): there is no '
      f"compact network for it; its winner's input-sliced pruned weights are in "
      f'search/winner_weights.msgpack'
    )
  mask = run.mask(record['index'], samplers.from_config(config.search))
  name = f'candidate{record["index"]}_compact'
  folder = workdir_lib.path(workdir, workdir_lib.SEARCH)
  variables = jax.device_get(run.state.variables)
  described = {
    'index': record['index'],
    'val_acc': record['val_acc'],
    'input_slice_params': record['params'],
    'input_slice_flops': record['flops'],
    **deploy(run.model, variables, mask, dataset.image_shape, os.path.join(folder, name), measure),
  }
  workdir_lib.write_json(os.path.join(folder, name + '.json'), described)
  logging.info('candidate %d exported to %s', record['index'], folder)
  return described
