"""Where CPU training time goes: forward, input gradient and kernel gradient of the
convolutions of the default super-network on XLA:CPU and on oneDNN, and the whole train step.

    python benchmarks/conv_gradients.py [--batch 128] [--repeats 10]

Each convolution is timed as XLA compiles it (``jax.lax.conv_general_dilated``) and as the
train step runs it on CPU (``pgnas_jax.backends.cpu``, oneDNN), with the largest relative
difference of oneDNN's results from XLA's (float32 rounding). Pin the process to one core
(``taskset -c 0``) for per-core figures. The last rows time the whole train step of the
default network against a plain forward and backward pass of the same network without masks
or ELBO terms, both on the CPU kernels.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import harness  # noqa: E402
from pgnas_jax import parallel  # noqa: E402
from pgnas_jax.backends.cpu import kernels as cpu_kernels  # noqa: E402
from pgnas_jax.backends.cpu import ops as cpu_ops  # noqa: E402

# (height = width, input channels, output channels, kernel, stride) of the default network's
# searchable convs: stage 0 at 28x28, the strided first convs of stages 1 and 2, the rest
SHAPES = (
  (28, 16, 16, 3, 1),
  (28, 16, 32, 3, 2),
  (14, 32, 32, 3, 1),
  (14, 32, 64, 3, 2),
  (7, 64, 64, 3, 1),
)


def xla_conv(x, w, stride):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def onednn_conv(x, w, stride):
  return cpu_kernels.conv(x, w, stride, 1, 1, None)


def timed_parts(conv, x, w, g, s, repeats):
  """(forward, input gradient, kernel gradient): milliseconds and results."""
  parts = (
    jax.jit(lambda x, w, g: conv(x, w, s)),
    jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w, s), x)[1](g)[0]),
    jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0]),
  )
  return [(1e3 * harness.timed(lambda: f(x, w, g), repeats), f(x, w, g)) for f in parts]


def conv_rows(batch, repeats):
  rng = np.random.default_rng(0)
  rows = []
  for size, c, f, k, s in SHAPES:
    x = jnp.asarray(rng.standard_normal((batch, size, size, c)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((k, k, c, f)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(xla_conv(x, w, s).shape), jnp.float32)
    xla = timed_parts(xla_conv, x, w, g, s, repeats)
    onednn = timed_parts(onednn_conv, x, w, g, s, repeats)
    row = {'conv': f'{batch}x{size}x{size}x{c} -> {f}, {k}x{k}/{s}'}
    for name, (ms, _), (ms1, _) in zip(('forward', 'input_grad', 'kernel_grad'), xla, onednn):
      row[f'xla_{name}_ms'], row[f'onednn_{name}_ms'] = ms, ms1
    row['xla_over_onednn'] = sum(p[0] for p in xla) / sum(p[0] for p in onednn)
    row['largest_rel_diff'] = max(
      float(jnp.max(jnp.abs(a[1] - b[1])) / jnp.max(jnp.abs(a[1]))) for a, b in zip(xla, onednn)
    )
    rows.append(row)
  return rows


def step_rows(batch, repeats):
  config, model, shape, classes, _ = harness.network('default')
  mesh = harness.mesh_of(1)
  state, _, step = harness.train_state(config, model, shape, mesh)
  data = harness.synthetic_batch(batch, shape, classes)
  placed = parallel.put_batch({'images': data['images'], 'labels': data['labels']}, mesh)
  weights, stats = jax.tree.map(jnp.copy, (state.params['weights'], state.batch_stats))

  def logits(w, x):
    return model.apply(
      {'params': w, 'batch_stats': stats},
      x,
      train=True,
      rngs={'shake': jax.random.key(0)},
      mutable=['batch_stats'],
    )[0]

  def nll(w, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(w, x), y))

  def as_trained(fn):  # the CPU kernels, as in the train step
    def run(*args):
      with cpu_ops.in_use(mesh):
        return fn(*args)

    return jax.jit(run)

  forward, backward = as_trained(logits), as_trained(jax.grad(nll))
  compiled = step.lower(state, placed).compile()
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], placed)
    return metrics['loss']

  ms = lambda fn: 1e3 * harness.timed(fn, repeats)
  return [
    {'what': 'train_step (relaxed masks, ELBO, SGD update)', 'ms': ms(one_step)},
    {
      'what': 'forward + backward, no masks, cross-entropy only',
      'ms': ms(lambda: backward(weights, placed['images'], placed['labels'])),
    },
    {'what': 'forward only (training mode)', 'ms': ms(lambda: forward(weights, placed['images']))},
  ]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeats', type=int, default=10)
  args = p.parse_args()
  if not cpu_kernels.available():
    sys.exit(f"oneDNN's convolutions are unavailable: {cpu_kernels.INSTALL_HINT}")
  rows = conv_rows(args.batch, args.repeats)
  harness.write_table('conv_gradients', 'Convolutions on XLA:CPU and oneDNN', list(rows[0]), rows)
  steps = step_rows(args.batch, args.repeats)
  harness.write_table(
    'train_step_parts',
    'The default train step against a plain forward and backward',
    list(steps[0]),
    steps,
  )


if __name__ == '__main__':
  main()
