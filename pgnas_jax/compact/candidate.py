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

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import compact, errors, parallel, search, supernets, train
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax.compact import files, latency


def deploy(model, variables: dict, mask, image_shape: tuple, folder: str, name: str,
           measure: bool = True) -> dict:
  """Writes the compact network as ``<name>.npz`` and ``<name>.stablehlo`` in ``folder``;
  returns arch.json's fields for it (counts, files and, if ``measure``, latency)."""
  net = compact.build(model, variables, mask, image_shape)
  out = {'compact_params': compact.num_params(net), 'compact_flops': compact.macs(net),
         'compact_files': files.save(net, folder, name)}
  if measure:
    out['latency_ms'] = latency.measure(model, variables, mask, net)
  return out


def _read_json_lines(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished(workdir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(workdir):
    raise errors.ExportError(f'--workdir={workdir} does not exist; give the folder of a '
                             f'finished run of python -m pgnas_jax.main')
  if not os.path.exists(os.path.join(workdir, 'report.md')):
    raise errors.ExportError(
        f'--workdir={workdir} holds no finished run (no report.md); run python -m '
        f'pgnas_jax.main --workdir={workdir} with its config to finish it first')
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def _candidate(workdir: str, index) -> dict:
  """The candidate's line of ``search/candidates.jsonl``; None: the winner's."""
  if index is None:
    with open(os.path.join(workdir, 'search', 'arch.json')) as f:
      index = json.load(f)['index']
  records = {r['index']: r for r in _read_json_lines(
      os.path.join(workdir, 'search', 'candidates.jsonl'))}
  if index not in records:
    raise errors.ExportError(
        f'--candidate={index} is not in {workdir}/search/candidates.jsonl (candidates '
        f'0..{len(records) - 1}); give one of those')
  return records[index]


def restore(workdir: str, config: ml_collections.ConfigDict) -> tuple:
  """(model, trained variables, drop logits, search key, mask template, image shape) of a
  finished run, from its newest checkpoint."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  dataset = data_lib.load(config.data)
  image_shape = data_lib.image_shape(dataset)
  model = supernets.build(config.model, dataset.num_classes)
  run = train.setup(config, dataset)
  state, space = train.initialise(model, config, image_shape, run.tx, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    restored = checkpointer.restore_latest(state)
  finally:
    checkpointer.close()
  if restored is None:
    raise errors.ExportError(f'{workdir} has no readable checkpoint to export from')
  state = jax.device_get(restored)
  variables = {'params': state.params['weights'], 'batch_stats': state.batch_stats}
  return (model, variables, state.params['drop_logits'],
          train.purpose_key(state.root_key, 'search'), space.template, image_shape)


def from_workdir(workdir: str, index=None, measure: bool = True) -> dict:
  """Exports candidate ``index`` (None: the winner) of a finished run as
  ``search/candidate<index>_compact.{npz,stablehlo,json}``; returns the description."""
  config = _finished(workdir)
  record = _candidate(workdir, index)
  model, variables, drop_logits, search_key, template, image_shape = restore(workdir, config)
  mask = search.candidate_mask(search_key, record['index'], drop_logits, template)
  name = f"candidate{record['index']}_compact"
  folder = os.path.join(workdir, 'search')
  described = {'index': record['index'], 'val_acc': record['val_acc'],
               'input_slice_params': record['params'], 'input_slice_flops': record['flops'],
               **deploy(model, variables, mask, image_shape, folder, name, measure)}
  with open(os.path.join(folder, name + '.json'), 'w') as f:
    json.dump(described, f, indent=1)
    f.write('\n')
  logging.info('candidate %d exported to %s', record['index'], folder)
  return described
