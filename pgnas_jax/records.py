"""``search/candidates.jsonl``, the record of the scored candidates: one line per candidate,
appended durably as each chunk is scored and read back when a search resumes.

Each line carries ``run``, an id of what determines the scores (the trained weights, the
drop logits and the search key), and ``check``, a checksum of the line's other values. A
resumed search keeps the lines up to the first one this run did not write (another run's,
edited, damaged, blank, cut short, out of order) and cuts the file back there with a warning
naming that line: scores are deterministic, so the search scores again from there and ends
as an uninterrupted run would.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os

import jax
import numpy as np

from pgnas_jax import parallel, rng
from pgnas_jax import workdir as workdir_lib

FIELDS = ('index', 'val_acc', 'val_loss', 'params', 'flops', 'dropped', 'run', 'check')


def run_id(search_key: jax.Array, drop_logits, variables: dict, sampler: str = 'iid') -> str:
  """16 hex digits of a hash of everything a candidate's scores follow from, besides the
  config (which the workdir's ``config.json`` pins): the trained weights and BatchNorm
  statistics, the drop logits, the search key and its generator (``rng.impl``), and the
  sampler (``samplers.Sampler.id``). The default generator and sampler add nothing, so the
  run ids of runs made before they could be chosen stay valid."""
  digest = hashlib.sha256(np.asarray(jax.random.key_data(search_key)).tobytes())
  impl = rng.impl_name(search_key)
  if impl != rng.DEFAULT:
    digest.update(f'rng.impl:{impl}'.encode())
  if sampler != 'iid':
    digest.update(f'search.sampler:{sampler}'.encode())
  for tree in (drop_logits, variables):
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
      leaf = np.asarray(leaf)
      digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}'.encode())
      digest.update(leaf.tobytes())
  return digest.hexdigest()[:16]


def _checksum(record: dict) -> str:
  values = {k: v for k, v in record.items() if k != 'check'}
  text = json.dumps(values, sort_keys=True, separators=(',', ':'), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def make(run: str, index: int, scores: tuple, costs: tuple, dropped: dict) -> dict:
  """A candidate's record as it is written and read back: its ``scores`` (validation
  accuracy, mean loss; a non-finite loss is None), ``costs`` (params, FLOPs) and the
  channels ``dropped`` per group."""
  (val_acc, val_loss), (params, flops) = scores, costs
  record = workdir_lib.finite(
    {
      'index': index,
      'val_acc': val_acc,
      'val_loss': val_loss,
      'params': params,
      'flops': flops,
      'dropped': dropped,
      'run': run,
    }
  )
  return {**record, 'check': _checksum(record)}


def amend(record: dict, **fields) -> dict:
  """``record`` with ``fields`` set (what follows from its scores, such as whether it fits a
  budget) and its checksum made again."""
  record = {k: v for k, v in {**record, **fields}.items() if k != 'check'}
  return {**record, 'check': _checksum(record)}


def to_line(record: dict) -> str:
  return workdir_lib.to_json(record) + '\n'


def append(path: str, records: list) -> None:
  """Appends the lines with flush + fsync: a kill leaves at most a cut last line."""
  with open(path, 'a') as out:
    out.write(''.join(to_line(r) for r in records))
    out.flush()
    os.fsync(out.fileno())


def _no_constants(name: str):
  raise ValueError(f'{name}, which pgnas_jax never writes')


def _problem(line: bytes, expected_index: int, run: str | None) -> tuple:
  """(record, None) for a valid line of candidate ``expected_index``, else (None, why)."""
  if not line.endswith(b'\n'):
    return None, 'is cut short (a run killed while writing it)'
  if not line.strip():
    return None, 'is blank'
  try:
    record = json.loads(line, parse_constant=_no_constants)
  except ValueError as e:
    why = str(e) if 'never writes' in str(e) else 'cut or damaged'
    return None, f'is not a JSON record ({why})'
  missing = [k for k in FIELDS if not isinstance(record, dict) or k not in record]
  if missing:
    return None, f'lacks {", ".join(missing)} (edited, or written by an older version)'
  if record['check'] != _checksum(record):
    return None, 'does not match its checksum (edited or damaged)'
  if run is not None and record['run'] != run:
    return None, f"was written by another run (run id {record['run']}, this run's {run})"
  if record['index'] != expected_index:
    return None, f'holds candidate {record["index"]} where {expected_index} belongs'
  return record, None


@dataclasses.dataclass
class Scan:
  records: list  # the valid prefix
  ends: list  # byte offset after each of them
  problem: str | None  # 'line N ...why' of the first line that is not valid


def scan(path: str, run: str | None = None) -> Scan:
  """The file's valid prefix: lines of candidates 0, 1, ... in order, each intact and (with
  ``run``) written by that run. Without ``run``, the first line's run is the one expected."""
  found = Scan([], [], None)
  if not os.path.exists(path):
    return found
  with open(path, 'rb') as f:
    lines = f.readlines()
  offset = 0
  for number, line in enumerate(lines, 1):
    record, why = _problem(line, len(found.records), run)
    if why:
      found.problem = f'line {number} {why}'
      break
    run = record['run']
    offset += len(line)
    found.records.append(record)
    found.ends.append(offset)
  return found


def read(path: str) -> list:
  """The candidates a finished run recorded (its valid prefix, which is all of them)."""
  found = scan(path)
  if found.problem:
    logging.warning(
      '%s: %s; reading the %d candidates before it', path, found.problem, len(found.records)
    )
  return found.records


def resume(path: str, run: str) -> list:
  """The candidates an earlier, interrupted search of run ``run`` recorded. Every process
  reads the file and they agree on how many to keep; after a barrier, process 0 cuts the
  file back to them, warning which line was not valid and why."""
  found = scan(path, run)
  keep = parallel.min_over_processes(len(found.records))
  parallel.barrier('candidates read')  # before process 0 changes the file
  if found.problem or keep < len(found.records):
    problem = (
      found.problem
      if keep == len(found.records)
      else f'line {keep + 1} is not valid on another process'
    )
    if parallel.is_main_process():
      logging.warning(
        '%s: %s; cut back to the %d valid lines before it, the search scores '
        'again from candidate %d',
        path,
        problem,
        keep,
        keep,
      )
      with open(path, 'r+b') as f:
        f.truncate(found.ends[keep - 1] if keep else 0)
        os.fsync(f.fileno())
  return found.records[:keep]


def unresolved_ranking(records: list, validation_size: int) -> str | None:
  """Why the ranking cannot tell the candidates apart, or None: when their validation
  accuracies spread less than one image (standard deviation below ``1 / validation_size``),
  the resolution of accuracy is coarser than the differences between candidates, and the
  winner is picked mostly by the tie-break (fewer parameters). The message names the
  smallest useful size: where one image is the measured spread, or ten times the size when
  every candidate tied (the spread is then below what this size can measure)."""
  accs = np.array([r['val_acc'] for r in records], np.float64)
  spread = float(np.std(accs))
  if len(accs) < 2 or spread * validation_size >= 1:
    return None
  if spread == 0:
    tied = f'all {len(accs)} candidates tie at validation accuracy {accs[0]:.4f}'
    smallest = 10 * validation_size
    how = 'the differences between candidates are below one image; 10x is a first guess'
  else:
    tied = (
      f"the {len(accs)} candidates' validation accuracies spread {spread:.2g} "
      f'(standard deviation), less than one image ({1 / validation_size:.2g})'
    )
    smallest = math.ceil(1 / spread)
    how = 'one image is then the measured spread'
  return (
    f'--config.data.validation_size={validation_size} is too small to rank: {tied}, so '
    f'the winner was picked mostly by fewer parameters; use at least {smallest} '
    f'({how}), or a data set with more images'
  )
