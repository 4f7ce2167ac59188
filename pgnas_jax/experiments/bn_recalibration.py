"""What BatchNorm recalibration before scoring (``search.bn_recalibration_batches``) does to
ranking fidelity, and what it costs, with the replication study's machinery:

    python -m pgnas_jax.experiments.bn_recalibration --workdir=DIR [--quick]

One PGNAS run (``replicate.Runner.arm``) and its ranking-fidelity candidates
(``Runner.fidelity``: evenly spaced places of the ranking, each fine-tuned identically); then
those candidates are scored again on the validation split with their BatchNorm statistics
re-estimated on R training batches, for each R in ``RECALIBRATION_BATCHES``. For each R:
Kendall tau between validation accuracy and test accuracy after fine-tuning, and seconds per
candidate (one candidate per call, as ``chunk_size='auto'`` scores on CPU; compilation
excluded). Writes ``DIR/bn_recalibration.json`` and ``DIR/bn_recalibration.md``; the run
and the fine-tuning are cached as in the replication study.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from pgnas_jax import cli as cli_lib
from pgnas_jax import data as data_lib
from pgnas_jax import search
from pgnas_jax import trained as trained_lib
from pgnas_jax.experiments import replicate, replication_report

RECALIBRATION_BATCHES = (0, 1, 4)  # 0: the trained running statistics (the paper)

# Small enough for about 10 minutes on a 2-core machine shared with other jobs (measured
# at about 20 images/s of training for the 8/16/32 network there): a tiny network, a short
# training and few fidelity candidates; Kendall tau over 6 candidates is a coarse measure.
SMALL = replicate.Study(
  seeds=(0,),
  stem_width=4,
  widths=(4, 8, 16),
  train_epochs=1.0,
  train_steps=150,
  batch_size=64,
  validation_size=500,
  candidates=16,
  sweep_candidates=16,
  candidate_counts=(16,),
  l2_values=(50.0,),
  taus=(0.2,),
  finetune_steps=10,
  fidelity_candidates=6,
  full_p=0.001,
)
QUICK = dataclasses.replace(replicate.QUICK, candidate_counts=(6,))


def _timed_scores(scorer, variables, masks: list, validation, recalibration) -> tuple:
  """Validation accuracy of each mask, scored one per call, and seconds per candidate (the
  first call, which compiles, is not timed)."""
  scorer.candidates(variables, masks[0], validation, recalibration)
  start = time.time()
  accs = [float(scorer.candidates(variables, m, validation, recalibration)[0][0]) for m in masks]
  return accs, (time.time() - start) / len(masks)


def measure(study: replicate.Study, workdir: str, data_dir: str | None = None) -> dict:
  runner = replicate.Runner(study, workdir, data_dir)
  run = runner.arm('pgnas', study.seeds[0], study.candidate_counts, None)
  fidelity = runner.fidelity(run)
  config = replicate.arm_config(study, 'pgnas', study.seeds[0], data_dir)
  trained = trained_lib.restore(
    runner.run_dir('pgnas', study.seeds[0]), config, runner.dataset, runner.mesh
  )
  scorer = search.Scorer(trained.model, runner.mesh, config.model.compute_dtype)
  batch_size = config.search.eval_batch_size
  validation = data_lib.replicated_batches(
    runner.dataset.validation, runner.dataset, batch_size, runner.mesh
  )
  masks = [jax.tree.map(lambda m: m[None], trained.mask(f['index'])) for f in fidelity]
  finetuned = [f['finetuned_test_acc'] for f in fidelity]
  rows = []
  for r in RECALIBRATION_BATCHES:
    recalibration = search.recalibration_images(runner.dataset, r, batch_size, runner.mesh)
    accs, seconds = _timed_scores(scorer, trained.state.variables, masks, validation, recalibration)
    if r == 0:  # the search's own scores, recomputed
      np.testing.assert_allclose(accs, [f['val_acc'] for f in fidelity], atol=1e-9)
    rows.append(
      {
        'batches': r,
        'images': r * batch_size,
        'val_accs': accs,
        'kendall_tau': replication_report.kendall_tau(accs, finetuned),
        'seconds_per_candidate': seconds,
      }
    )
    logging.info(
      'recalibration on %d batches: Kendall tau %.3f, %.3f s per candidate',
      r,
      rows[-1]['kendall_tau'],
      seconds,
    )
  results = {
    'study': dataclasses.asdict(study),
    'machine': f'{jax.devices()[0].platform}, {os.cpu_count()} cores',
    'eval_batch_size': batch_size,
    'validation_images': runner.dataset.validation.num_examples,
    'candidates': [f['index'] for f in fidelity],
    'finetuned_test_accs': finetuned,
    'rows': rows,
  }
  with open(os.path.join(workdir, 'bn_recalibration.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'bn_recalibration.md'), 'w') as f:
    f.write('\n'.join(markdown(results)) + '\n')
  return results


def markdown(results: dict) -> list:
  n = len(results['candidates'])
  lines = [
    (
      f'Kendall tau between validation accuracy ({results["validation_images"]} images) '
      f'and test accuracy after {results["study"]["finetune_steps"]} fine-tuning steps, '
      f'over {n} candidates; seconds per candidate scored one at a time '
      f'({results["machine"]}):'
    ),
    '',
    '| BatchNorm statistics | Kendall tau | s per candidate |',
    '|---|---|---|',
  ]
  for row in results['rows']:
    what = (
      'trained running statistics'
      if row['batches'] == 0
      else f're-estimated on {row["batches"]} x {results["eval_batch_size"]} training images'
    )
    lines.append(f'| {what} | {row["kendall_tau"]:.3f} | {row["seconds_per_candidate"]:.3f} |')
  return lines


def cli():
  workdir = flags.DEFINE_string('workdir', None, 'Directory for the run and the results.')
  quick = flags.DEFINE_bool('quick', False, 'A tiny measurement (a few steps) for CI.')
  flags.mark_flag_as_required('workdir')

  def run(argv):
    logging.get_absl_handler().addFilter(cli_lib.quiet_libraries)
    if len(argv) > 1:
      cli_lib.fail(f'unexpected arguments {argv[1:]}')
    results = cli_lib.exit_on_user_errors(measure, QUICK if quick.value else SMALL, workdir.value)
    print('\n'.join(markdown(results)))

  app.run(run)


if __name__ == '__main__':
  cli()
