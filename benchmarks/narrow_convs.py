"""What a convolution's width costs on this CPU (issue 28): why a target's candidates keep
channels in blocks of 16 (``search.channel_multiple='auto'``, docs/targets.md).

    python benchmarks/narrow_convs.py [--rounds 7] [--size 28] [--batch 128]

Times XLA's SAME 3x3 convolution (what a compact network runs) at the default network's
first stage (28x28 images, batch 128) for every pair of input and output widths in
``WIDTHS``, on one device of the CPU split the main job makes. The convolutions are timed in
turn, ``--rounds`` rounds of ``CALLS`` calls each, so that a machine slowing down for a while
slows them all alike; each reports the median over rounds of a round's median. The second
table is each convolution's MACs per millisecond against the 16 -> 16 one's: where it is well
below 1, removing channels saves less time than MACs. Prints both tables and writes them
as ``benchmarks/results/narrow_convs{,_rate}.{md,json}``.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.rehearsal import cpu_name  # noqa: E402
from pgnas_jax import config as config_lib  # noqa: E402
from pgnas_jax.backends.cpu import host_devices  # noqa: E402
from pgnas_jax.compact import derived  # noqa: E402
from pgnas_jax.compact import latency as measuring  # noqa: E402

WIDTHS = (4, 8, 12, 16, 24, 32)
CALLS = 5
REFERENCE = (16, 16)


def measure(size: int, batch: int, rounds: int) -> dict:
  """(input width, output width) -> median milliseconds per call."""
  device = jax.devices()[0]
  rng = np.random.default_rng(0)

  def conv(x, kernel):
    return derived.same_conv(x, kernel, 1, 1, 1)

  timers = {}
  for cin in WIDTHS:
    x = jax.device_put(rng.standard_normal((batch, size, size, cin)).astype(np.float32), device)
    for cout in WIDTHS:
      kernel = jax.device_put(rng.standard_normal((3, 3, cin, cout)).astype(np.float32), device)
      timers[cin, cout] = measuring.timer(conv, x, kernel, repeats=CALLS)
  times = {pair: [] for pair in timers}
  for r in range(rounds):
    for pair, window in timers.items():
      times[pair].append(window())
    print(f'round {r + 1}/{rounds}', flush=True)
  return {pair: statistics.median(t) for pair, t in times.items()}


def tables(ms: dict, size: int, batch: int, rounds: int, split: str) -> None:
  macs = lambda cin, cout: batch * size * size * 9 * cin * cout
  rate = lambda pair: macs(*pair) / ms[pair]
  columns = ['in \\ out'] + [str(w) for w in WIDTHS]
  times = [{'in \\ out': cin, **{str(o): ms[cin, o] for o in WIDTHS}} for cin in WIDTHS]
  rates = [
    {'in \\ out': cin, **{str(o): rate((cin, o)) / rate(REFERENCE) for o in WIDTHS}}
    for cin in WIDTHS
  ]
  where = f'{cpu_name()}; {split}; {rounds} rounds of {CALLS} calls, timed in turn'
  harness.write_table(
    'narrow_convs',
    f'3x3 convolution at {size}x{size}, batch {batch}: ms per call',
    columns,
    times,
    f'{where}. Rows: input channels; columns: output channels.',
  )
  harness.write_table(
    'narrow_convs_rate',
    f'The same: MACs per ms against {REFERENCE[0]} -> {REFERENCE[1]}',
    columns,
    rates,
    where + '.',
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--size', type=int, default=28)
  p.add_argument('--batch', type=int, default=128)
  args = p.parse_args()
  split = host_devices.split_for(host_devices.AUTO, config_lib.get_config())
  ms = measure(args.size, args.batch, args.rounds)
  tables(ms, args.size, args.batch, args.rounds, split)


if __name__ == '__main__':
  main()
