"""The accuracy-params, accuracy-FLOPs and, where latency is predicted, accuracy-latency
Pareto fronts of the scored candidates: ``search/pareto.json`` and ``plots/pareto.png``.

A candidate is on a front when no other candidate is at least as accurate (validation) and at
most as costly, and strictly better in one of the two. Candidates with equal accuracy and
cost are the same point: all of them are on the front, or none.
"""

import itertools

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

COSTS = ('params', 'flops', 'latency_ms')
_FIELDS = ('index', 'val_acc', 'params', 'flops', 'latency_ms', 'fits')
_LABELS = {
  'params': 'parameters',
  'flops': 'FLOPs (MACs)',
  'latency_ms': 'predicted latency (ms)',
}


def costs_of(records: list) -> tuple:
  """The costs every record has: params and FLOPs, and predicted latency when the run
  predicts it."""
  return tuple(c for c in COSTS if records and all(c in r for r in records))


def front(records: list, cost: str) -> list:
  """The records on the accuracy-``cost`` front, cheapest first (ties: lower index)."""
  ordered = sorted(records, key=lambda r: (r[cost], -r['val_acc'], r['index']))
  best_cheaper = float('-inf')  # best accuracy among strictly cheaper candidates
  on_front = []
  for _, same_cost in itertools.groupby(ordered, key=lambda r: r[cost]):
    same_cost = list(same_cost)
    top = same_cost[0]['val_acc']
    if top > best_cheaper:
      on_front += [r for r in same_cost if r['val_acc'] == top]
      best_cheaper = top
  return on_front


def summary(
  records: list, supernet: dict, winner_index: int | None, budget: dict, measured=()
) -> dict:
  """What ``search/pareto.json`` holds: each front (each candidate's index, validation
  accuracy, costs and whether it fits the budget; on the latency front, the latency
  ``measured`` for it where it was), the full super-network, the winner's index and the
  budget."""
  measured = {m['index']: m['measured_ms'] for m in measured}
  fronts = {}
  for cost in costs_of(records):
    fronts[cost] = [{k: r[k] for k in _FIELDS if k in r} for r in front(records, cost)]
  for r in fronts.get('latency_ms', []):
    if r['index'] in measured:
      r['measured_latency_ms'] = measured[r['index']]
  return {'supernet': supernet, 'winner': winner_index, 'budget': budget, **fronts}


def plot(records: list, pareto: dict, path: str) -> None:
  """Every candidate, the fronts, the full super-network and the winner."""
  costs = costs_of(records)
  fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
  for ax, cost in zip(axes[0], costs):
    ax.scatter(
      [r[cost] for r in records],
      [r['val_acc'] for r in records],
      s=8,
      color='tab:gray',
      alpha=0.5,
      label=f'{len(records)} candidates',
    )
    points = pareto[cost]
    ax.step(
      [r[cost] for r in points],
      [r['val_acc'] for r in points],
      where='post',
      color='tab:blue',
      marker='o',
      markersize=4,
      label=f'Pareto front ({len(points)})',
    )
    full = pareto['supernet']
    ax.scatter(
      [full.get(cost, float('nan'))],
      [full['val_acc']],
      marker='*',
      s=150,
      color='tab:red',
      label='full super-network',
      zorder=3,
    )
    winner = [r for r in records if r['index'] == pareto['winner']]
    if winner:
      ax.scatter(
        [winner[0][cost]],
        [winner[0]['val_acc']],
        marker='D',
        s=50,
        facecolors='none',
        edgecolors='tab:green',
        linewidths=2,
        label=f'winner #{pareto["winner"]}',
        zorder=4,
      )
    limit = pareto['budget'].get(f'max_{cost}')
    if limit is not None:
      ax.axvline(limit, color='tab:orange', linestyle='--', label='budget')
    ax.set_xlabel(_LABELS[cost])
    ax.set_ylabel('validation accuracy (inherited weights)')
    ax.legend(fontsize=7)
  fig.suptitle('Accuracy against size and compute of the scored candidates')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(pareto: dict) -> list:
  """report.md's lines listing the fronts; on the latency front, predicted against measured
  latency where it was measured."""
  lines = ['## Pareto fronts', '']
  titles = {'params': 'params', 'flops': 'FLOPs', 'latency_ms': 'predicted latency'}
  for cost in [c for c in COSTS if c in pareto]:
    latency = cost == 'latency_ms'
    extra = ' predicted ms | measured ms | error |' if latency else ''
    lines += [
      f'Candidates on the accuracy against {titles[cost]} front (cheapest first; * the winner):',
      '',
      f'| candidate | validation acc | params | FLOPs (MACs) |{extra} fits the budget |',
      '|---|---|---|---|' + ('---|---|---|' if latency else '') + '---|',
    ]
    for r in pareto[cost]:
      mark = ' *' if r['index'] == pareto['winner'] else ''
      fits = {True: 'yes', False: 'no'}.get(r.get('fits'), '')
      cells = f'| #{r["index"]}{mark} | {r["val_acc"]:.4f} | {r["params"]:,} | {r["flops"]:,} |'
      if latency:
        cells += f' {r["latency_ms"]:.2f} | {_measured_cells(r)} |'
      lines.append(f'{cells} {fits} |')
    lines.append('')
  return lines


def _measured_cells(record: dict) -> str:
  if 'measured_latency_ms' not in record:
    return ' | '
  measured = record['measured_latency_ms']
  return f'{measured:.2f} | {100 * (record["latency_ms"] - measured) / measured:+.1f}%'
