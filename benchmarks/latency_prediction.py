"""How well the latency table predicts measured latency, on this machine.

    python benchmarks/latency_prediction.py [--network default] [--candidates 24]
        [--batch 128] [--channel_multiple 1] [--name latency_prediction]

makes the table a run with a latency target makes (``pgnas_jax.latency_table``: every
convolution measured at its grid widths, the full and the smallest network measured whole),
from an empty cache so that its time is the first run's; then draws ``--candidates``
candidates, each from drop probabilities drawn per group uniformly in [0.05, 0.85] (a
learned posterior is as uneven), in blocks of ``--channel_multiple``, and compares each
one's predicted latency with its compact network measured whole (the same statistic:
median of 20 calls after 3). The CPU is split into devices as the main job splits it.
Prints the table and writes ``benchmarks/results/<--name>.md`` and ``.json``.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from pgnas_jax import latency_table, masks, samplers, supernets  # noqa: E402
from pgnas_jax import space as space_lib  # noqa: E402
from pgnas_jax.backends.cpu import host_devices  # noqa: E402


def _candidates(space, count: int, multiple: int) -> list:
  rng = np.random.default_rng(0)
  sampler = samplers.Sampler(channel_multiple=multiple)
  out = []
  for c in range(count):
    p = {name: rng.uniform(0.05, 0.85) for name in space_lib.group_names(space)}
    logits = jax.tree_util.tree_map_with_path(
      lambda path, t: masks.init_drop_logits(t, p['/'.join(k.key for k in path)]), space.template
    )
    drawn = sampler(jax.random.key(c), jnp.arange(1), logits, space.template)
    out.append(jax.tree.map(lambda m: np.asarray(m[0]), drawn))
  return out


def _spearman(a, b) -> float:
  ranks = lambda x: np.argsort(np.argsort(x))
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def run(network: str, count: int, batch: int, multiple: int) -> dict:
  make_config, image_shape, classes, description = harness.NETWORKS[network]
  model = supernets.build(make_config().model, classes)
  variables = space_lib.initial_variables(model, image_shape, jax.random.key(0))
  space = space_lib.from_variables(variables)
  predictor = latency_table.Predictor(model, variables, image_shape, batch)
  start = time.time()
  table = predictor.table(space, multiple)
  made_s = time.time() - start
  rows = []
  for i, mask in enumerate(_candidates(space, count, multiple)):
    convs = predictor.convs(mask)
    table = table._replace(entries=predictor.measured(table.entries, convs))
    predicted, measured = table.predict(convs), predictor.whole_ms([mask])[0][0]
    params, flops = space_lib.costs(space, mask)
    rows.append(
      {'candidate': i, 'flops': int(flops), 'predicted_ms': predicted, 'measured_ms': measured}
    )
    print(f'candidate {i}: predicted {predicted:.2f} ms, measured {measured:.2f} ms', flush=True)
  errors = np.array([(r['predicted_ms'] - r['measured_ms']) / r['measured_ms'] for r in rows])
  return {
    'network': description,
    'device': table.device,
    'batch': batch,
    'channel_multiple': multiple,
    'table_seconds': made_s,
    'entries': len(table.entries),
    'full_ms': table.full_ms,
    'smallest_ms': table.smallest_ms,
    'scale': table.scale,
    'offset_ms': table.offset_ms,
    'call_ms': table.call_ms,
    'median_abs_error': float(np.median(np.abs(errors))),
    'largest_abs_error': float(np.max(np.abs(errors))),
    'mean_error': float(np.mean(errors)),
    'spearman_predicted_measured': _spearman(
      [r['predicted_ms'] for r in rows], [r['measured_ms'] for r in rows]
    ),
    'spearman_flops_measured': _spearman(
      [r['flops'] for r in rows], [r['measured_ms'] for r in rows]
    ),
    'candidates': rows,
  }


def markdown(result: dict, split: str) -> str:
  r = result
  lines = [
    '# Latency prediction against measurement',
    '',
    f'{r["network"]}; {r["device"]} ({platform.processor() or platform.machine()}); {split}; '
    f'batch {r["batch"]}, channel_multiple {r["channel_multiple"]}. '
    f'`python benchmarks/latency_prediction.py` (see its docstring).',
    '',
    '| | |',
    '|---|---|',
    f'| table made from an empty cache | {r["table_seconds"]:.1f} s, {r["entries"]} entries |',
    f'| full / smallest network, measured | {r["full_ms"]:.2f} / {r["smallest_ms"]:.2f} ms |',
    f'| line: scale, offset; cost of a call | {r["scale"]:.3f}, {r["offset_ms"]:.2f} ms; '
    f'{r["call_ms"]:.3f} ms |',
    f'| candidates | {len(r["candidates"])} |',
    f'| median / largest absolute error | {100 * r["median_abs_error"]:.1f}% / '
    f'{100 * r["largest_abs_error"]:.1f}% |',
    f'| mean error (bias) | {100 * r["mean_error"]:+.1f}% |',
    f'| rank correlation with measured: predicted latency / FLOPs | '
    f'{r["spearman_predicted_measured"]:.3f} / {r["spearman_flops_measured"]:.3f} |',
    '',
    '| candidate | FLOPs (MACs) | predicted ms | measured ms | error |',
    '|---|---:|---:|---:|---:|',
  ]
  for c in r['candidates']:
    error = 100 * (c['predicted_ms'] - c['measured_ms']) / c['measured_ms']
    lines.append(
      f'| {c["candidate"]} | {c["flops"]:,} | {c["predicted_ms"]:.2f} | '
      f'{c["measured_ms"]:.2f} | {error:+.1f}% |'
    )
  return '\n'.join(lines) + '\n'


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default', choices=sorted(harness.NETWORKS))
  p.add_argument('--candidates', type=int, default=24)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--channel_multiple', type=int, default=1)
  p.add_argument('--name', default='latency_prediction')
  args = p.parse_args()
  split = host_devices.split_for(host_devices.AUTO, harness.NETWORKS[args.network][0]())
  with tempfile.TemporaryDirectory() as cache:
    os.environ['XDG_CACHE_HOME'] = cache
    result = run(args.network, args.candidates, args.batch, args.channel_multiple)
  text = markdown(result, split)
  print(text)
  os.makedirs(harness.RESULTS, exist_ok=True)
  with open(os.path.join(harness.RESULTS, f'{args.name}.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(harness.RESULTS, f'{args.name}.json'), 'w') as f:
    json.dump({**result, 'cpu_split': split}, f, indent=1)


if __name__ == '__main__':
  main()
