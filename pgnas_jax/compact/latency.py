"""Inference latency of a candidate on this machine: the compact network, the masked
super-network (what the search scores) and the full super-network, at a few batch sizes.

Each is jitted and compiled first and called ``WARMUP`` times; then, per batch size, the
three are timed in turn for ``ROUNDS`` rounds of ``REPEATS // ROUNDS`` calls, one call at a
time, blocking on the logits, and each reports the median over its rounds of a round's
median. In turn, so that a machine that slows down for a while (a shared host) slows all
three alike: their ratio, the speed-up, is what a run reports (measured one after the
other on a shared 2-core Intel Xeon (AVX-512), one compact network's speed-up at batch 128
read 1.26x to 1.72x in three runs; timed in turn, its quartiles over 15 rounds were 1.51x
and 1.60x).
"""

import functools
import os
import statistics
import time

import jax
import numpy as np

from pgnas_jax import compact
from pgnas_jax.backends.cpu import host_devices

BATCH_SIZES = (1, 128)
WARMUP = 3
REPEATS = 20
ROUNDS = 5


def timer(fn, *args, repeats: int = REPEATS):
  """``fn`` compiled for ``args`` and warmed up; returns a function that times ``repeats``
  calls and gives their median in milliseconds (call it again for another window)."""
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(WARMUP):
    jax.block_until_ready(compiled(*args))

  def window() -> float:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)

  return window


def median_ms(fn, *args, repeats: int = REPEATS) -> float:
  return timer(fn, *args, repeats=repeats)()


def networks(model, variables: dict, mask, net: compact.CompactNet) -> dict:
  """name -> (function of (weights, images), its weights)."""
  supernet = functools.partial(model.apply, train=False)
  weights = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return {
    'compact': (compact.inference_fn(net), net.weights),
    'masked_supernet': (supernet, {**weights, 'masks': mask}),
    'supernet': (supernet, weights),
  }


def measure(
  model,
  variables: dict,
  mask,
  net: compact.CompactNet,
  batch_sizes=BATCH_SIZES,
  repeats: int = REPEATS,
) -> dict:
  """arch.json's ``latency_ms``: per network and batch size, the median milliseconds per
  call, and where they were measured."""
  rng = np.random.default_rng(0)
  calls = max(1, repeats // ROUNDS)
  out = {
    'device': describe_device(),
    'statistic': f'median over {ROUNDS} rounds, the three networks timed in turn, of the '
    f'median of {calls} calls, after {WARMUP} warm-up calls',
  }
  found = networks(model, variables, mask, net)
  for name in found:
    out[name] = {}
  device = jax.devices()[0]
  for b in batch_sizes:
    images = rng.standard_normal((b,) + net.image_shape).astype(np.float32)
    timers = {
      name: timer(fn, jax.device_put(jax.device_get(weights), device), images, repeats=calls)
      for name, (fn, weights) in found.items()
    }
    rounds = {name: [] for name in timers}
    for _ in range(ROUNDS):
      for name, window in timers.items():
        rounds[name].append(window())
    for name, times in rounds.items():
      out[name][str(b)] = statistics.median(times)
  return out


def describe_device() -> str:
  """The device the latencies are measured on; on a CPU split into several devices
  (``--cpu_devices``), one of them, single-threaded when the split says so."""
  devices = jax.devices()
  where = f'{devices[0].platform}, {os.cpu_count()} cores'
  if devices[0].platform == 'cpu' and len(devices) > 1:
    threads = (
      'single-threaded ' if host_devices.ONE_THREAD_FLAG in os.environ.get('XLA_FLAGS', '') else ''
    )
    where += f', one {threads}device of {len(devices)}'
  return f'{devices[0].device_kind} ({where}), jax {jax.__version__}'
