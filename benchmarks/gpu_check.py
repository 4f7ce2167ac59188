"""The GPU check: one prepared run, under 8 minutes on one H100/H200, of

  * the train step of SupNet-MI (CIFAR shape, batch 128) in bfloat16 and float32;
  * the train step of SupNet-D-121 (224x224) in bfloat16 and float32 at batch 128 and at
    the largest batch that fits (from the compiled program's memory use at 128);
  * ranking throughput of SupNet-MI on 5,000 validation images: candidates/s of the vmapped
    evaluator at a few chunk sizes against one candidate at a time and a plain forward pass.

    python benchmarks/gpu_check.py [--out DIR] [--smoke]

Each result is printed and appended to ``DIR/gpu_check.jsonl`` (default ``results/``) as soon
as it is measured, so a run cut short keeps what it measured: on a lent machine pass
``--out=$OUT`` and do not pipe the output through a filter (``grep`` holds it back). MFU is
achieved FLOP/s over the chip's dense peak: bf16 989 TFLOP/s, and for float32 the TF32 peak
494.5 TFLOP/s, since XLA runs float32 convolutions on TF32 tensor cores by default on Hopper
(H100/H200 SXM datasheet figures). ``--smoke`` runs the same code at toy sizes (CPU check;
SupNet-D-121 with one dense layer per block on 32x32 images).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from pgnas_jax import masks as masks_lib  # noqa: E402
from pgnas_jax import parallel, search, supernets  # noqa: E402
from pgnas_jax import space as space_lib  # noqa: E402

PEAK_FLOPS = {'bfloat16': 989e12, 'float32': 494.5e12}
START = time.time()


def results_log(folder: str):
  """``log(row)``: prints a result and appends it to ``folder/gpu_check.jsonl`` at once."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'gpu_check.jsonl')

  def log(row: dict) -> None:
    row = {**row, 'elapsed_s': round(time.time() - START, 1)}
    print(json.dumps(row), flush=True)
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')

  return log


def train_row(log, name, dtype, batch_size, steps, smoke):
  config, model, shape, classes, _ = harness.network(name, dtype)
  if smoke and name == 'd121':  # one dense layer per block: the full one compiles for minutes
    shape = (32, 32, 3)
    config.model.densenet.blocks = (1, 1, 1, 1)
    model = supernets.build(config.model, classes)
  t = harness.time_train_step(config, model, shape, classes, batch_size, steps, harness.mesh_of(1))
  achieved = t.train_flops / t.step_s
  row = {
    'check': 'train_step',
    'network': name,
    'dtype': dtype,
    'batch': batch_size,
    'compile_s': round(t.compile_s, 1),
    'step_ms': round(1e3 * t.step_s, 2),
    'images_per_s': round(batch_size / t.step_s, 1),
    'achieved_TFLOP_per_s': round(achieved / 1e12, 2),
    'MFU': round(achieved / PEAK_FLOPS[dtype], 4),
    'temp_GiB': round(t.temp_bytes / 2**30, 2),
    'peak_GiB': round((t.peak_bytes or 0) / 2**30, 2),
  }
  log(row)
  return row


def largest_batch(row: dict, smoke: bool) -> int:
  """From a run's temporaries per image: the largest multiple of 64 whose temporaries fill at
  most 80% of the device memory left beside the weights (at most 2048)."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit', 0)
  if smoke or not limit:
    return 2 * row['batch']
  per_image = row['temp_GiB'] * 2**30 / row['batch']
  fits = int(0.8 * (limit - stats.get('bytes_in_use', 0)) / per_image)
  return max(64, min(2048, fits // 64 * 64))


def ranking_rows(log, smoke):
  name = 'default' if smoke else 'mi'
  config, model, shape, classes, _ = harness.network(name, 'bfloat16')
  mesh = harness.mesh_of(1)
  variables = jax.jit(lambda k: model.init({'params': k}, jnp.zeros((1,) + shape), train=False))(
    jax.random.key(0)
  )
  space = space_lib.from_variables(variables)
  weights = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  logits = masks_lib.init_drop_logits(space.template, 0.1)
  num_images, eval_batch, candidates = (200, 50, 4) if smoke else (5000, 500, 16)
  flops = harness.forward_flops(space)
  for dtype in ('bfloat16', 'float32'):
    batches = [
      parallel.put_replicated(harness.synthetic_batch(eval_batch, shape, classes, i), mesh)
      for i in range(num_images // eval_batch)
    ]
    plain = search.make_full_scorer(model, mesh, dtype)
    seconds = harness.timed(lambda: search.evaluate(plain, (weights,), batches), 2)
    floor = num_images / seconds
    log(
      {
        'check': 'ranking',
        'network': name,
        'dtype': dtype,
        'way': 'plain forward',
        'chunk': 0,
        'eval_batch': eval_batch,
        'images_per_s': round(floor, 1),
        'MFU': round(floor * flops / PEAK_FLOPS[dtype], 4),
      }
    )
    scorer = search.make_chunk_scorer(model, mesh, dtype)
    for chunk in (1, 2) if smoke else (1, 4, 16):
      masks = [
        jax.device_get(
          search.draw_candidates(
            jax.random.key(1), jnp.arange(s, s + chunk), logits, space.template
          )
        )
        for s in range(0, candidates, chunk)
      ]
      seconds = harness.timed(
        lambda: [search.evaluate(scorer, (weights, m), batches) for m in masks], 1
      )
      log(
        {
          'check': 'ranking',
          'network': name,
          'dtype': dtype,
          'way': 'one at a time' if chunk == 1 else 'vmapped chunk',
          'chunk': chunk,
          'eval_batch': eval_batch,
          'candidates_per_s': round(candidates / seconds, 2),
          'images_per_s': round(candidates * num_images / seconds, 1),
          'ratio_to_plain': round(candidates * num_images / seconds / floor, 3),
        }
      )


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=harness.RESULTS, help='folder for gpu_check.jsonl')
  p.add_argument('--smoke', action='store_true', help='toy sizes, to check the script on CPU')
  args = p.parse_args()
  log = results_log(args.out)
  jax.config.update('jax_compilation_cache_dir', '/tmp/pgnas_jax_compilation_cache')
  log({'check': 'device', 'device': harness.device_description()})
  steps = 3 if args.smoke else 20
  for dtype in ('bfloat16', 'float32'):
    train_row(
      log, 'default' if args.smoke else 'mi', dtype, 16 if args.smoke else 128, steps, args.smoke
    )
  ranking_rows(log, args.smoke)
  for dtype in ('bfloat16', 'float32'):
    first = train_row(
      log, 'd121', dtype, 4 if args.smoke else 128, 3 if args.smoke else 10, args.smoke
    )
    train_row(
      log, 'd121', dtype, largest_batch(first, args.smoke), 3 if args.smoke else 5, args.smoke
    )
  log({'check': 'done'})


if __name__ == '__main__':
  main()
