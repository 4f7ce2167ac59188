"""The paper's ablations reproduced at small scale, on Fashion-MNIST with a small super-network of
the SupNet-M family (the embedded default's in the full study), with one command:

    python -m pgnas_jax.experiments.replicate --workdir=DIR [--quick]

writes ``DIR/replication.md``, ``DIR/results.json`` and the figures under ``DIR/figures/``.
Every training and search is the main job (``pipeline.run``) in its own workdir,
``DIR/runs/<arm>/seed<s>``; what the study adds (winners among the first C candidates, their
test accuracy, fine-tuning, the ranking-fidelity check) reuses the project's search and
fine-tuning code and is cached beside each run in ``study.json``. Run the same command again
after an interruption: finished runs and analyses are skipped, an interrupted run resumes
from its last checkpoint or its last scored candidate. ``DIR/sizes.json`` records the study's
sizes; a workdir holding a study of other sizes (``--quick`` or not) is refused.

Arms (``Study`` sets the sizes; ``FULL`` is the committed study, ``QUICK`` the CI one):
  * ``pgnas``: PGNAS as configured by default; ranks enough candidates for Table 6;
  * ``random``: predefined dropout (drop logits frozen at p0, paper Table 3 "Random"), p0
    chosen from the ``pgnas`` winners' sizes (``choose_random_p``);
  * ``full``: the super-network trained without dropout to speak of (p = ``full_p`` frozen),
    evaluated whole: the paper's "full model";
  * ``l2_<v>``, ``tau_<t>``: PGNAS with another weight-prior l2 or temperature (Tables 4, 5).
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import finetune, parallel, pipeline, report, search
from pgnas_jax import records as records_lib
from pgnas_jax import trained as trained_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.experiments import replication_report, studies


@dataclasses.dataclass(frozen=True)
class Study:
  seeds: tuple
  stem_width: int  # the SupNet-M-family super-network: stem and stage widths
  widths: tuple
  train_epochs: float
  train_steps: int  # > 0 overrides train_epochs
  batch_size: int
  validation_size: int  # images held out of training for ranking
  candidates: int  # Random and PGNAS compared among this many (Table 3, Figure 1)
  sweep_candidates: int  # the l2 and tau arms rank this many (Tables 4, 5)
  candidate_counts: tuple  # Table 6: the pgnas arm's winner among its first C candidates
  l2_values: tuple  # Table 4; must hold weight_prior_l2
  taus: tuple  # Table 5; must hold the default config's tau
  finetune_steps: int  # "a short fine-tuning": Random's and PGNAS's winners, fidelity
  fidelity_candidates: int  # spread over the pgnas seed-0 ranking, each fine-tuned
  full_p: float  # frozen drop probability of the "full model" arm
  # the pgnas arm's weight prior: the embedded default's until it moved to a stronger prior
  # that shows the method at the default's size; docs/replication.md was measured with 50
  weight_prior_l2: float = 50.0

  def pgnas_candidates(self) -> int:
    return max(self.candidate_counts + (self.candidates, self.sweep_candidates))


FULL = Study(
  seeds=(0, 1, 2),
  stem_width=16,
  widths=(16, 32, 64),
  train_epochs=1.5,
  train_steps=-1,
  batch_size=128,
  validation_size=2000,
  candidates=200,
  sweep_candidates=100,
  candidate_counts=(10, 50, 100, 200, 500),
  l2_values=(10.0, 50.0, 250.0),
  taus=(2 / 3, 0.2),
  finetune_steps=100,
  fidelity_candidates=20,
  full_p=0.001,
)
QUICK = Study(
  seeds=(0,),
  stem_width=4,
  widths=(4,),
  train_epochs=1.0,
  train_steps=12,
  batch_size=64,
  validation_size=200,
  candidates=6,
  sweep_candidates=4,
  candidate_counts=(2, 4, 8),
  l2_values=(50.0, 250.0),
  taus=(2 / 3, 0.2),
  finetune_steps=4,
  fidelity_candidates=4,
  full_p=0.001,
)


def base_config(study: Study, seed: int, data_dir: str | None) -> ml_collections.ConfigDict:
  """The embedded default with the study's network, budget and weight prior: every arm
  starts from it."""
  c = config_lib.get_config()
  c.seed = seed
  c.objective.weight_prior_l2 = study.weight_prior_l2
  c.model.shake_shake.stem_width = study.stem_width
  c.model.shake_shake.widths = study.widths
  if data_dir:
    c.data.data_dir = data_dir
  c.data.validation_size = study.validation_size
  c.train.num_epochs = study.train_epochs
  c.train.num_steps = study.train_steps
  c.train.batch_size = study.batch_size
  c.checkpoint.every_steps = 200
  return c


def arm_config(
  study: Study, arm: str, seed: int, data_dir: str | None, random_p: float | None = None
) -> ml_collections.ConfigDict:
  c = base_config(study, seed, data_dir)
  c.search.num_candidates = study.sweep_candidates
  if arm == 'pgnas':
    c.search.num_candidates = study.pgnas_candidates()
  elif arm == 'random':
    c.drop.mode, c.drop.random_p = 'random', random_p
    c.search.num_candidates = study.candidates
  elif arm == 'full':
    c.drop.mode, c.drop.random_p = 'random', study.full_p
    c.search.num_candidates = 1  # only the whole super-network is reported
  elif arm.startswith('l2_'):
    c.objective.weight_prior_l2 = float(arm[len('l2_') :])
  elif arm.startswith('tau_'):
    c.drop.tau = float(arm[len('tau_') :])
  else:
    raise ValueError(f'unknown arm {arm!r}')
  config_lib.validate(c)
  return c


def arm_names(study: Study) -> list:
  """Every arm but ``random`` (which waits for p0); sweep values equal to the default
  config's are the ``pgnas`` arm."""
  default = config_lib.get_config()
  sweeps = [
    replication_report.sweep_arm('l2', v, study.weight_prior_l2) for v in study.l2_values
  ] + [replication_report.sweep_arm('tau', t, default.drop.tau) for t in study.taus]
  return ['pgnas', 'full'] + [arm for arm in sweeps if arm != 'pgnas']


def choose_random_p(pgnas_runs: list, candidates: int) -> float:
  """p0 of the Random arm, chosen as the paper's supplement does: so that Random's candidates
  are about as large as PGNAS's winners. Under Random every channel is dropped with p0, so a
  candidate keeps (1 - p0) of the searchable weights on average: p0 = 1 - the mean share of
  searchable weights that the PGNAS winners (among ``candidates``) keep, to 2 decimals."""
  shares = [
    (r['winners'][str(candidates)]['params'] - r['fixed_params'])
    / (r['supernet']['params'] - r['fixed_params'])
    for r in pgnas_runs
  ]
  return float(np.clip(round(1.0 - float(np.mean(shares)), 2), 0.01, 0.95))


class Runner:
  """Runs and analyses the arms of one study under ``workdir``, skipping what is done."""

  def __init__(self, study: Study, workdir: str, data_dir: str | None):
    self.study, self.workdir, self.data_dir = study, workdir, data_dir
    self.mesh = parallel.make_mesh()
    config = base_config(study, 0, data_dir)
    self.dataset = data_lib.load(config.data)
    self._compute_dtype = config.model.compute_dtype
    self._test = data_lib.device_batches(
      self.dataset.test, self.dataset, config.search.eval_batch_size, self.mesh
    )
    self._runs_total = len(study.seeds) * (len(arm_names(study)) + 1)  # + random
    self._runs_seen = 0
    self._start = time.time()

  def run_dir(self, arm: str, seed: int) -> str:
    return os.path.join(self.workdir, 'runs', arm, f'seed{seed}')

  def _test_accuracy(self, trained: trained_lib.Trained, variables: dict, mask) -> float:
    scorer = search.Scorer(trained.model, self.mesh, self._compute_dtype)
    return scorer.architecture(variables, mask, self._test)[0]

  def _finetuner(self, config, trained: trained_lib.Trained) -> Callable:
    """``tune(mask) -> test accuracy after the study's fine-tuning`` for one run: its seed's
    batches after its last training step, its objective (compiled once per run)."""
    config = config.copy_and_resolve_references()
    config.finetune.steps = self.study.finetune_steps
    tuner = finetune.Finetuner(trained.model, config, self.dataset, trained.space, self.mesh)

    def tune(mask) -> float:
      return self._test_accuracy(trained, tuner.tune(trained.state, mask), mask)

    return tune

  def _tested_winners(self, winners: dict, arch: dict, trained) -> dict:
    """Per C of ``winners`` (C -> record), the winner among the first C candidates with its
    test accuracy (the run's own winner's from ``arch``, others tested on ``trained``)."""
    tested = {arch['index']: arch['test_acc']}
    for w in winners.values():
      if w['index'] not in tested:
        variables, mask = trained.state.variables, trained.mask(w['index'])
        tested[w['index']] = self._test_accuracy(trained, variables, mask)
    return {
      str(C): {
        'index': w['index'],
        'val_acc': w['val_acc'],
        'params': w['params'],
        'test_acc': tested[w['index']],
      }
      for C, w in winners.items()
    }

  def arm(
    self, arm: str, seed: int, counts: tuple, finetune_at: int | None, random_p: float | None = None
  ) -> dict:
    """Trains and searches one arm and seed with the main job, then records its winners among
    the first C candidates for every C in ``counts`` (and fine-tunes the one at
    ``finetune_at``); cached in the run's ``study.json``."""
    workdir = self.run_dir(arm, seed)
    cache = os.path.join(workdir, 'study.json')
    self._runs_seen += 1
    if os.path.exists(cache):
      return workdir_lib.read_json(cache)
    start = time.time()
    config = arm_config(self.study, arm, seed, self.data_dir, random_p)
    logging.info(
      'study: run %d of %d: %s, seed %d (%.0f min so far)',
      self._runs_seen,
      self._runs_total,
      arm,
      seed,
      (start - self._start) / 60,
    )
    done = pipeline.run(config, workdir)
    winners = {C: search.choose_winner(done.records[:C]) for C in counts}
    needs_model = finetune_at is not None or any(
      w['index'] != done.arch['index'] for w in winners.values()
    )
    trained = trained_lib.restore(workdir, config, self.dataset, self.mesh) if needs_model else None
    result = {
      'arm': arm,
      'seed': seed,
      'config': config.to_dict(),
      'supernet': done.arch['supernet'],
      'fixed_params': None if trained is None else int(trained.space.fixed_params),
      'mean_p': report.mean_drop_probability(done.posterior),
      'winners': self._tested_winners(winners, done.arch, trained),
      'val_accs': [r['val_acc'] for r in done.records],
      'num_candidates': len(done.records),
      'train_seconds': done.timings['train'],
      'search_seconds': done.timings['search'],
    }
    if finetune_at is not None:
      index = winners[finetune_at]['index']
      result['finetuned'] = {
        'C': finetune_at,
        'index': index,
        'steps': self.study.finetune_steps,
        'test_acc': self._finetuner(config, trained)(trained.mask(index)),
      }
    result['wall_seconds'] = time.time() - start
    if parallel.is_main_process():
      workdir_lib.write_json(cache, result)
    return result

  def fidelity(self, pgnas_seed0: dict) -> list:
    """Ranking fidelity: ``fidelity_candidates`` candidates at evenly spaced places of the
    pgnas seed-0 ranking, each fine-tuned identically; their inherited-weight validation
    accuracy against their test accuracy after fine-tuning. One line per candidate in
    ``fidelity.jsonl``, appended as each finishes."""
    path = os.path.join(self.workdir, 'fidelity.jsonl')
    done = []
    if os.path.exists(path):
      with open(path) as f:
        done = [json.loads(line) for line in f]
    seed = self.study.seeds[0]
    workdir = self.run_dir('pgnas', seed)
    records = records_lib.read(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
    ranked = sorted(records, key=search.ranking_key)
    places = np.unique(
      np.round(np.linspace(0, len(ranked) - 1, self.study.fidelity_candidates)).astype(int)
    )
    todo = [(int(p), ranked[p]) for p in places][len(done) :]
    if not todo:
      return done
    config = arm_config(self.study, 'pgnas', seed, self.data_dir)
    trained = trained_lib.restore(workdir, config, self.dataset, self.mesh)
    tune = self._finetuner(config, trained)
    for place, record in todo:
      start = time.time()
      mask = trained.mask(record['index'])
      line = {
        'place': place + 1,
        'index': record['index'],
        'val_acc': record['val_acc'],
        'params': record['params'],
        'test_acc': self._test_accuracy(trained, trained.state.variables, mask),
        'finetuned_test_acc': tune(mask),
      }
      line['wall_seconds'] = time.time() - start
      logging.info(
        'study: fidelity %d/%d (place %d): val %.4f, fine-tuned test %.4f',
        len(done) + 1,
        len(places),
        line['place'],
        line['val_acc'],
        line['finetuned_test_acc'],
      )
      if parallel.is_main_process():
        with open(path, 'a') as f:
          f.write(workdir_lib.to_json(line) + '\n')
      done.append(line)
    return done


def run_study(study: Study, workdir: str, data_dir: str | None = None, command: str = '') -> dict:
  """Runs (or resumes) the whole study and writes the report; returns the results."""
  studies.claim_workdir(study, workdir)
  runner = Runner(study, workdir, data_dir)
  runs = {}
  counts = tuple(sorted(set(study.candidate_counts + (study.candidates, study.sweep_candidates))))
  runs['pgnas'] = [runner.arm('pgnas', s, counts, study.candidates) for s in study.seeds]
  random_p = choose_random_p(runs['pgnas'], study.candidates)
  logging.info('study: p0 of the Random arm = %.2f', random_p)
  runs['random'] = [
    runner.arm('random', s, (study.candidates,), study.candidates, random_p) for s in study.seeds
  ]
  for arm in arm_names(study)[1:]:
    runs[arm] = [runner.arm(arm, s, (study.sweep_candidates,), None) for s in study.seeds]
  fidelity = runner.fidelity(runs['pgnas'][0])
  default = config_lib.get_config()
  results = {
    'study': dataclasses.asdict(study),
    'command': command,
    'machine': f'{jax.devices()[0].platform}, {os.cpu_count()} cores',
    'default_l2': study.weight_prior_l2,
    'default_tau': default.drop.tau,
    'random_p': random_p,
    'runs': runs,
    'fidelity': fidelity,
    'wall_seconds': sum(r['wall_seconds'] for rs in runs.values() for r in rs)
    + sum(f['wall_seconds'] for f in fidelity),
  }
  if parallel.is_main_process():
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
    replication_report.write(results, workdir)
  return results


def cli():
  studies.cli(
    'pgnas_jax.experiments.replicate',
    run_study,
    FULL,
    QUICK,
    'replication.md',
    'A tiny study (one seed, a few steps) that runs every arm, table and figure in a few minutes.',
  )


if __name__ == '__main__':
  cli()
