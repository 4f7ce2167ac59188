"""The sampling study's report: ``sampling.md`` and ``figures/*.png`` from the results that
``sampling.run_study`` collects (``results.json``), and the statistics they use. Pure
functions of those results, so the report can be regenerated, and tested, without running
anything:

    python -m pgnas_jax.experiments.sampling_report DIR   (reads DIR/results.json)
"""

import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from pgnas_jax.experiments import replication_report, studies

REFERENCE = 'reference'


def count_duplicates(masks) -> int:
  """How many candidates repeat the mask of an earlier one: candidates minus distinct masks
  (``masks``: leaves with a leading candidate axis)."""
  leaves = [np.asarray(m) for m in jax.tree.leaves(masks)]
  rows = np.concatenate([m.reshape(len(m), -1) > 0.5 for m in leaves], axis=1)
  return len(rows) - len({row.tobytes() for row in rows})


def coupled_block(sampler: str, stratified_block: int) -> int:
  """Consecutive candidates a sampler draws together (pairs, blocks), resampled as one."""
  return {'antithetic': 2, 'stratified': stratified_block}.get(sampler, 1)


def bootstrap_best_of_n(
  pools: list, n: int, block: int, resamples: int, seed: int = 0, level: float = 0.95
) -> tuple:
  """(mean, low, high): the best validation accuracy among ``n`` candidates, averaged over
  ``pools`` (one per trained super-network: its candidates' accuracies in index order), by
  the bootstrap: each of ``resamples`` resamples draws, per pool, ``ceil(n / block)`` blocks
  of ``block`` consecutive candidates with replacement (so that a sampler's pairs or blocks
  stay together), keeps the first ``n`` candidates and takes their best, then averages over
  the pools. The mean of the resamples and their percentile interval at ``level``."""
  rng = np.random.default_rng(seed)
  means = np.zeros(resamples)
  for pool in pools:
    pool = np.asarray(pool, float)
    blocks = [pool[i : i + block] for i in range(0, len(pool), block)]
    need = -(-n // block)
    for r in range(resamples):
      picked = rng.integers(0, len(blocks), need)
      means[r] += np.concatenate([blocks[i] for i in picked])[:n].max()
  means /= len(pools)
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(means.mean()), float(low), float(high)


def size_spread(params) -> dict:
  params = np.asarray(params, float)
  return {
    'mean': float(params.mean()),
    'std': float(params.std()),
    'min': float(params.min()),
    'max': float(params.max()),
  }


def gradient_rows(results: dict) -> list:
  """Per estimator, its drop-logit gradient against the reference's (both over the groups'
  logits): draws; relative bias ||m - r|| / ||r||; the same for the noise alone
  (sqrt(sum of both means' variances) / ||r||, what an unbiased estimator's relative bias
  is about); the bias in standard errors (root mean square over the logits); the cosine
  between m and r; the relative variance of one draw, sum(var) / ||r||^2; seconds per
  draw."""
  g = results['gradients']
  ref = np.array(g[REFERENCE]['mean'])
  ref_se2 = np.array(g[REFERENCE]['var']) / g[REFERENCE]['draws']
  norm = np.linalg.norm(ref)
  rows = []
  for name in results['estimators']:
    m, v, n = np.array(g[name]['mean']), np.array(g[name]['var']), g[name]['draws']
    se2 = v / n + ref_se2
    rows.append(
      {
        'estimator': name,
        'draws': n,
        'relative_bias': float(np.linalg.norm(m - ref) / norm),
        'noise': float(np.sqrt(se2.sum()) / norm),
        'bias_se': float(np.sqrt(np.mean(np.square(m - ref) / se2))),
        'cosine': float(m @ ref / (np.linalg.norm(m) * norm)),
        'relative_variance': float(v.sum() / norm**2),
        'ms_per_draw': 1e3 * g[name]['seconds_per_draw'],
      }
    )
  return rows


def training_rows(results: dict) -> list:
  """Per estimator: winner test accuracies, params, mean learned p, training and search
  seconds (per seed), the range of the groups' learned p over all seeds, and the timed
  train step (ms)."""
  return [
    {
      'estimator': name,
      'test_acc': [r['winner']['test_acc'] for r in runs],
      'params': [r['winner']['params'] for r in runs],
      'mean_p': [r['mean_p'] for r in runs],
      'p_range': (min(min(r['p']) for r in runs), max(max(r['p']) for r in runs)),
      'train_seconds': [r['train_seconds'] for r in runs],
      'wall_seconds': [r['wall_seconds'] for r in runs],
      'step_ms': results['timing']['estimators'][name]['step_ms'],
    }
    for name, runs in results['training'].items()
  ]


def _pools(results: dict, sampler: str, estimator: str | None = None, key: str = 'val_accs'):
  """One list per trained super-network (of ``estimator``, or of all)."""
  return [
    c[sampler][key]
    for name, runs in results['candidates'].items()
    if estimator in (None, name)
    for c in runs
  ]


def best_of_n_rows(results: dict, estimator: str | None = None) -> list:
  """Per sampler: for each N of the study, (N, ``bootstrap_best_of_n``) over the trained
  super-networks of ``estimator`` (all when None)."""
  s = results['study']
  rows = []
  for sampler in results['samplers']:
    pools = _pools(results, sampler, estimator)
    block = coupled_block(sampler, s['stratified_block'])
    rows.append(
      {
        'sampler': sampler,
        'estimator': estimator or 'all',
        'points': [
          (n, *bootstrap_best_of_n(pools, n, block, s['bootstrap_resamples']))
          for n in s['candidate_counts']
        ],
      }
    )
  return rows


def candidate_rows(results: dict) -> list:
  """Per sampler: candidates and duplicates (summed over trained super-networks) and the
  spread of candidate params (pooled)."""
  rows = []
  for sampler in results['samplers']:
    runs = [c[sampler] for rs in results['candidates'].values() for c in rs]
    rows.append(
      {
        'sampler': sampler,
        'candidates': sum(len(r['params']) for r in runs),
        'duplicates': sum(r['duplicates'] for r in runs),
        **size_spread([p for r in runs for p in r['params']]),
      }
    )
  return rows


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_gradients(results: dict, path: str) -> None:
  rows = gradient_rows(results)
  names = [r['estimator'] for r in rows]
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
  left.bar(names, [r['relative_bias'] for r in rows], color='tab:blue', label='measured')
  left.scatter(names, [r['noise'] for r in rows], color='k', marker='_', s=400, label='noise')
  left.set_ylabel('||mean - reference|| / ||reference||')
  left.set_title('bias of the drop-logit gradient')
  left.legend()
  right.bar(names, [r['relative_variance'] for r in rows], color='tab:orange')
  right.set_yscale('log')
  right.set_ylabel('sum of variances / ||reference||^2')
  right.set_title('variance of one draw')
  for ax in (left, right):
    ax.tick_params(axis='x', labelrotation=20)
  _save(fig, path)


def plot_estimators(results: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for row in training_rows(results):
    ax.scatter(row['params'], [100 * (1 - a) for a in row['test_acc']], label=row['estimator'])
  ax.set_xlabel('winner params')
  ax.set_ylabel('winner test error (%)')
  ax.set_title('one point per seed')
  ax.legend()
  _save(fig, path)


def plot_best_of_n(results: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for row in best_of_n_rows(results):
    n = [p[0] for p in row['points']]
    ax.plot(n, [p[1] for p in row['points']], marker='o', label=row['sampler'])
    ax.fill_between(n, [p[2] for p in row['points']], [p[3] for p in row['points']], alpha=0.2)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('candidates N')
  ax.set_ylabel('best validation accuracy among N')
  ax.set_title('bootstrap mean over trained super-networks, 95% band')
  ax.legend()
  _save(fig, path)


def plot_sizes(results: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  samplers = results['samplers']
  ax.boxplot([[p for pool in _pools(results, s, key='params') for p in pool] for s in samplers])
  ax.set_xticks(range(1, len(samplers) + 1), samplers)
  ax.set_ylabel('candidate params')
  ax.set_title('candidate sizes, all trained super-networks')
  _save(fig, path)


FIGURES = {
  'gradients.png': plot_gradients,
  'estimators.png': plot_estimators,
  'best_of_n.png': plot_best_of_n,
  'candidate_sizes.png': plot_sizes,
}


def _percent(values) -> str:
  """Mean ± sample std (over seeds) of accuracies, as error in %."""
  m, s = replication_report.mean_std([100.0 * (1.0 - v) for v in values])
  return f'{m:.2f} ± {s:.2f}' if np.isfinite(s) else f'{m:.2f}'


def _best_of_n_table(rows: list, counts: list) -> list:
  lines = [
    '| estimator | sampler | ' + ' | '.join(f'N = {n}' for n in counts) + ' |',
    '|---|---|' + '---|' * len(counts),
  ]
  for row in rows:
    cells = [f'{mean:.4f} [{low:.4f}, {high:.4f}]' for _, mean, low, high in row['points']]
    lines.append(f'| {row["estimator"]} | {row["sampler"]} | ' + ' | '.join(cells) + ' |')
  return lines


def _network(results: dict) -> str:
  net = results['network']['shake_shake']
  params = results['training'][results['default_estimator']][0]['supernet']['params']
  return (
    f'a SupNet-M-family super-network (stem {net["stem_width"]}, stage widths '
    f'{"/".join(str(w) for w in net["widths"])}, {net["blocks_per_stage"]} block per stage, '
    f'{len(net["kernel_sizes"])} branches, {params:,} params)'
  )


def markdown(results: dict) -> str:
  s = results['study']
  seeds = len(s['seeds'])
  counts = s['candidate_counts']
  per_estimator = [row for e in results['estimators'] for row in best_of_n_rows(results, e)]
  lines = [
    '# Gate estimators, candidate samplers and generators compared',
    '',
    f'Made by `{results["command"]}` on {results["machine"]}; wall time '
    f'{results["wall_seconds"] / 60:.1f} min (every piece, summed). Fashion-MNIST, '
    f'{_network(results)}; {seeds} seed(s) per estimator, each trained for '
    f'{s["train_steps"]} steps at batch {s["batch_size"]}; {s["validation_size"]} validation '
    f'images held out of training for ranking, test accuracy on the test split. Errors are '
    f'mean ± sample std over seeds.',
    '',
    '## Drop-logit gradient per estimator',
    '',
    f'On the trained super-network of `{results["default_estimator"]}` (first seed) and one '
    f"fixed training batch of {s['gradient_batch']} images: the gradient of the step's loss "
    f'with respect to the drop logits (one per group), over {s["gradient_draws"]} keys per '
    f'estimator (the same keys for all), against a reference: DisARM (unbiased) over '
    f'{s["reference_draws"]} other keys. *bias*: ||mean - reference|| / ||reference||; '
    f"*noise*: the same ratio expected from sampling error alone (both means' standard "
    f'errors): a bias near it is not resolved; *bias (SE)*: the root mean square over the '
    f'logits of the difference in standard errors (about 1 when unbiased); *variance*: the '
    f'summed variance of one draw over ||reference||^2; *step*: one train step '
    f"(the runs' step and batch, one device, median of {s['timing_rounds']} rounds, the "
    f'estimators timed in turn).',
    '',
    '| estimator | draws | bias | noise | bias (SE) | cosine | variance | ms per draw | step ms |',
    '|---|---|---|---|---|---|---|---|---|',
    *[
      f'| {r["estimator"]} | {r["draws"]} | {r["relative_bias"]:.3f} | {r["noise"]:.3f} | '
      f'{r["bias_se"]:.2f} | {r["cosine"]:.3f} | {r["relative_variance"]:.3g} | '
      f'{r["ms_per_draw"]:.1f} | {t["step_ms"]:.1f} |'
      for r in gradient_rows(results)
      for t in [results['timing']['estimators'][r['estimator']]]
    ],
    '',
    '![gradient bias and variance](figures/gradients.png)',
    '',
    '## Training per estimator',
    '',
    f'The main job with each estimator: winner among {s["candidates"]} iid candidates, its test '
    f'error and params; the mean learned drop probability (over channels) and the range of '
    f"the groups' learned p over the seeds; training time (compilation "
    f'included) and the wall time of the whole run (training, search, test and export).',
    '',
    '| estimator | winner test error (%) | winner params | mean learned p | p of the groups | '
    'training s | run wall s |',
    '|---|---|---|---|---|---|---|',
    *[
      f'| {r["estimator"]} | {_percent(r["test_acc"])} | {np.mean(r["params"]):,.0f} | '
      f'{np.mean(r["mean_p"]):.3f} | {r["p_range"][0]:.3f} to {r["p_range"][1]:.3f} | '
      f'{np.mean(r["train_seconds"]):.0f} | '
      f'{np.mean(r["wall_seconds"]):.0f} |'
      for r in training_rows(results)
    ],
    '',
    '![winners per estimator](figures/estimators.png)',
    '',
    '## Candidate samplers: best of N',
    '',
    f'Each sampler draws candidates 0..{s["candidates"] - 1} from every trained '
    f'super-network above, scored on the validation split. A cell is the best validation '
    f'accuracy among N candidates, averaged over the super-networks: the mean over '
    f"{s['bootstrap_resamples']} bootstrap resamples of N of a super-network's candidates "
    f'and their 95% interval (whole pairs resampled for `antithetic`, whole blocks of '
    f'{s["stratified_block"]} for `stratified`, so that their coupling is kept; single '
    f'candidates otherwise). It estimates what a search of N candidates gets, and how much '
    f'that varies with the search key. `mode` has one candidate whatever N.',
    '',
    *_best_of_n_table(best_of_n_rows(results), counts),
    '',
    'Per estimator (the super-networks it trained):',
    '',
    *_best_of_n_table(per_estimator, counts),
    '',
    '![best of N](figures/best_of_n.png)',
    '',
    '## Candidate samplers: duplicates and sizes',
    '',
    "Duplicates: candidates whose mask repeats an earlier candidate's of the same "
    "super-network, summed over super-networks. Sizes: the candidates' params, pooled.",
    '',
    '| sampler | candidates | duplicates | mean params | std | min | max |',
    '|---|---|---|---|---|---|---|',
    *[
      f'| {r["sampler"]} | {r["candidates"]} | {r["duplicates"]} | {r["mean"]:,.0f} | '
      f'{r["std"]:,.0f} | {r["min"]:,.0f} | {r["max"]:,.0f} |'
      for r in candidate_rows(results)
    ],
    '',
    '![candidate sizes](figures/candidate_sizes.png)',
    '',
    '## Generators',
    '',
    f"Per `rng.impl`: one train step (timed in turn with the estimators' above) and drawing "
    f'{s["mask_chunk"]} iid candidate masks (compiled `search.draw_candidates`, mean of '
    f'{s["mask_repeats"]} calls), one device.',
    '',
    '| generator | step ms | draw ms |',
    '|---|---|---|',
    *[
      f'| {name} | {t["step_ms"]:.1f} | {t["draw_ms"]:.3f} |'
      for name, t in results['timing']['generators'].items()
    ],
    '',
    '## What this measures and what it does not',
    '',
    f'- {seeds} seed(s) per estimator: differences of winner error smaller than the '
    "seeds' spread are not resolved; with one seed there is no spread at all.",
    '- The gradient section is one super-network at one point of training and one batch; '
    'other points may differ. The reference is itself an estimate (its noise is in the '
    '*noise* column).',
    '- The bootstrap intervals are over candidates of fixed trained super-networks: they '
    'hold the sampling noise of the search, not that of training.',
    '- Times are of this machine under its load at the time; compare within a table.',
    '',
  ]
  return '\n'.join(lines)


REPORT = studies.Report('sampling.md', markdown, FIGURES)
write = REPORT.write  # (results, workdir) -> the markdown path


if __name__ == '__main__':
  REPORT.rewrite(__doc__)
