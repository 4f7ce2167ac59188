"""What the main job writes into its workdir once training is done: every file of the
posterior, the winner and the report, on process 0 only (every process computes, one
writes). The streams written while the job runs (checkpoints, ``metrics.jsonl``, the
candidates' lines) belong to the stages that produce them."""

import json
import os

from absl import logging

from pgnas_jax import budget as budget_lib
from pgnas_jax import compact, export, pareto, report
from pgnas_jax import records as records_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.compact import candidate


class Outputs:
  """The files of a run in ``workdir``; every method does nothing unless ``writes``."""

  def __init__(self, workdir: str, writes: bool):
    self.workdir, self.writes = workdir, writes

  def path(self, name: str) -> str:
    return workdir_lib.path(self.workdir, name)

  def posterior(self, posterior: list) -> None:
    if self.writes:
      workdir_lib.write_json(self.path(workdir_lib.POSTERIOR), posterior)

  def budget_marks(self, records: list, budget: budget_lib.Budget) -> list:
    """``records`` with ``fits`` for this budget; candidates recorded under another budget (a
    resumed run) get theirs rewritten in the candidates file."""
    marked = budget_lib.mark(records, budget)
    if marked != records and self.writes:
      workdir_lib.write_atomically(
        self.path(workdir_lib.CANDIDATES), ''.join(records_lib.to_line(r) for r in marked)
      )
    return marked

  def warn(self, message: str | None) -> None:
    if message and self.writes:
      logging.warning('%s', message)

  def winner_weights(self, pruned: dict, finetuned: bool = False) -> None:
    name = workdir_lib.WINNER_FINETUNED_WEIGHTS if finetuned else workdir_lib.WINNER_WEIGHTS
    if self.writes:
      export.save_weights(self.path(name), pruned)

  def compact(self, model, variables: dict, mask, image_shape: tuple, measure: bool) -> dict:
    """The network to deploy, ``search/winner_compact.*``: arch.json's fields for it (empty
    where nothing is written, or where the network has an op the derivation cannot follow:
    then one line says which, and the input-sliced winner is what there is)."""
    if not self.writes:
      return {}
    stem = self.path(f'{workdir_lib.SEARCH}/winner_compact')
    try:
      return candidate.deploy(model, variables, mask, image_shape, stem, measure)
    except compact.Unsupported as e:
      logging.warning(
        "no compact network: %s; search/winner_weights.msgpack holds the winner's "
        'input-sliced pruned weights (docs/library.md)',
        e,
      )
      return {}

  def pareto(self, records: list, supernet: dict, winner_index, budget, measured=()):
    """``search/pareto.json`` and its plot; the fronts (None where nothing is written).
    ``measured``: latencies measured on the latency front (``latency_table``)."""
    if not self.writes:
      return None
    front = pareto.summary(records, supernet, winner_index, budget.as_dict(), measured)
    workdir_lib.write_json(self.path(workdir_lib.PARETO), front)
    pareto.plot(records, front, self.path(workdir_lib.PARETO_PLOT))
    return front

  def _metrics(self) -> list:
    """``metrics.jsonl``'s lines; a file deleted after training is written again empty,
    with a warning: only the training curves are lost, and the run can finish."""
    path = self.path(workdir_lib.METRICS)
    if not os.path.exists(path):
      logging.warning(
        '%s is missing (deleted after training?): the training curves of plots/training.png '
        'are lost, the results are not; an empty one is written so that the run finishes',
        path,
      )
      workdir_lib.write_atomically(path, '')
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def finished(self, result, budget, num_candidates: int) -> None:
    """arch.json, the plots, the Pareto fronts, timings and, last, report.md: its presence
    marks the run finished."""
    if not self.writes:
      return
    arch = result.arch
    workdir_lib.write_json(self.path(workdir_lib.ARCH), arch)
    metrics = self._metrics()
    report.plot_posterior(result.posterior, self.path(workdir_lib.POSTERIOR_PLOT))
    report.plot_candidates(
      [r['val_acc'] for r in result.records],
      arch['supernet']['val_acc'],
      arch['val_acc'],
      self.path(workdir_lib.CANDIDATES_PLOT),
    )
    report.plot_training(metrics, self.path(workdir_lib.TRAINING_PLOT))
    supernet = {
      k: arch['supernet'][k]
      for k in ('val_acc', 'params', 'flops', 'latency_ms')
      if k in arch['supernet']
    }
    front = self.pareto(
      result.records, supernet, arch['index'], budget, arch.get('latency_front', ())
    )
    workdir_lib.write_json(self.path(workdir_lib.TIMINGS), result.timings)
    report.write_markdown(
      self.path(workdir_lib.REPORT), arch, result.timings, num_candidates, result.posterior, front
    )
