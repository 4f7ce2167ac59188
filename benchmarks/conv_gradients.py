"""Where CPU training time goes: forward, input gradient and weight gradient of the
convolutions of the default super-network, and an alternative weight gradient.

    python benchmarks/conv_gradients.py [--batch 128] [--repeats 10]

The alternative computes the weight gradient as one matmul over the k x k shifted (and
strided) windows of the padded input, built from slices instead of XLA's patch extraction:
``dW[i, j, c, f] = sum_{n, y, x} x_pad[n, s*y + i, s*x + j, c] * g[n, y, x, f]``. Its largest
relative difference from XLA's weight gradient is in the table (float32 rounding only).
The last rows time the whole train step of the default network against a plain forward and
backward pass of the same network without masks or ELBO terms.
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

# (height = width, input channels, output channels, kernel, stride) of the default network's
# searchable convs: stage 0 at 28x28, the strided first convs of stages 1 and 2, the rest
SHAPES = (
  (28, 16, 16, 3, 1),
  (28, 16, 32, 3, 2),
  (14, 32, 32, 3, 1),
  (14, 32, 64, 3, 2),
  (7, 64, 64, 3, 1),
)


def conv(x, w, stride):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def weight_gradient_by_windows(x, g, kernel, stride):
  """The weight gradient of a SAME conv as one matmul over shifted windows of the input."""
  _, h, w, c = x.shape
  _, ho, wo, f = g.shape
  pad_h, pad_w = max((ho - 1) * stride + kernel - h, 0), max((wo - 1) * stride + kernel - w, 0)
  padded = jnp.pad(
    x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
  )
  windows = jnp.stack(
    [
      padded[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
      for i in range(kernel)
      for j in range(kernel)
    ],
    axis=3,
  )
  return jnp.einsum('nhwkc,nhwf->kcf', windows, g).reshape(kernel, kernel, c, f)


def conv_rows(batch, repeats):
  rng = np.random.default_rng(0)
  rows = []
  for size, c, f, k, s in SHAPES:
    x = jnp.asarray(rng.standard_normal((batch, size, size, c)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((k, k, c, f)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(conv(x, w, s).shape), jnp.float32)
    forward = jax.jit(lambda x, w: conv(x, w, s))
    input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w, s), x)[1](g)[0])
    weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0])
    by_windows = jax.jit(lambda x, g: weight_gradient_by_windows(x, g, k, s))
    reference = weight_grad(x, w, g)
    error = float(jnp.max(jnp.abs(by_windows(x, g) - reference)) / jnp.max(jnp.abs(reference)))
    ms = lambda fn, *a: 1e3 * harness.timed(lambda: fn(*a), repeats)
    row = {
      'conv': f'{batch}x{size}x{size}x{c} -> {f}, {k}x{k}/{s}',
      'forward_ms': ms(forward, x, w),
      'input_grad_ms': ms(input_grad, x, w, g),
      'weight_grad_ms': ms(weight_grad, x, w, g),
      'windows_weight_grad_ms': ms(by_windows, x, g),
      'windows_rel_diff': error,
    }
    row['weight_grad_over_forward'] = row['weight_grad_ms'] / row['forward_ms']
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

  forward, backward = jax.jit(logits), jax.jit(jax.grad(nll))
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
  rows = conv_rows(args.batch, args.repeats)
  harness.write_table('conv_gradients', 'Convolution gradients on XLA:CPU', list(rows[0]), rows)
  steps = step_rows(args.batch, args.repeats)
  harness.write_table(
    'train_step_parts',
    'The default train step against a plain forward and backward',
    list(steps[0]),
    steps,
  )


if __name__ == '__main__':
  main()
