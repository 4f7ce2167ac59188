"""Timing what the sampling study and the benchmarks (``benchmarks/``) both time: train steps
of the project's ``train_step`` on a synthetic batch, several variants of a config timed in
turn, and drawing a chunk of candidate masks. Every timing blocks on the result of each call.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import masks, parallel, rng, search, train


def synthetic_batch(batch_size: int, shape: tuple, classes: int, seed: int = 0) -> dict:
  """Standard-normal images and uniform labels: speed does not depend on pixel values."""
  rng = np.random.default_rng(seed)
  return {
    'images': rng.standard_normal((batch_size,) + tuple(shape), np.float32),
    'labels': rng.integers(0, classes, batch_size).astype(np.int32),
    'weights': np.ones(batch_size, np.float32),
  }


def train_state(config, model, shape, mesh, dataset=None, like=None):
  """(state, space, train_step) for ``config``: with ``dataset``, the run's own step (its
  optimiser, schedule and temperature: ``train.setup``), else one with a one-epoch cosine
  schedule. With ``like`` (a (state, space) of the same model and optimiser), a copy of its
  state with this config's root key instead of a fresh initialisation (no model
  initialisation to compile; for timing, where the weights' values do not matter)."""
  run = train.fixed_setup(config, 1000, 100) if dataset is None else train.setup(config, dataset)
  if like is None:
    state, space = train.initialise(model, config, shape, run.tx, mesh)
  else:  # a copy: every train step donates its state
    state, space = like
    key = parallel.put_replicated(rng.root_key(config.seed, config.rng.impl), mesh)
    state = jax.tree.map(lambda x: x.copy(), state).replace(root_key=key)
  step = train.make_train_step(model, space, config, run, mesh)
  return state, space, step


def timed(fn, repeats: int) -> float:
  """Seconds per call of ``fn`` (returning device arrays, or host values it waited for),
  after one warm-up call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def interleaved_step_times(
  configs: dict, model, batch: dict, rounds: int, mesh, dataset=None
) -> dict:
  """``{name: {'compile_s', 'step_ms'}}``: one train step of each config of ``configs``
  (name -> config of the same ``model`` and optimiser) on the host ``batch`` (images and
  labels: ``synthetic_batch``, or a data set's training batch), with ``dataset`` the run's
  own step (``train_state``). Every config starts from the first config's initial weights
  (``train_state``'s ``like``: the step time does not depend on their values). Every step
  is compiled first; then each round times one step of each in turn, so that a change of
  the machine's load falls on all of them alike; ``step_ms`` is the median over ``rounds``
  rounds, after one warm-up round."""
  steps, compile_s = {}, {}
  shape = batch['images'].shape[1:]
  batch = parallel.put_batch({'images': batch['images'], 'labels': batch['labels']}, mesh)
  like = None
  for name, config in configs.items():
    state, space, step = train_state(config, model, shape, mesh, dataset, like)
    if like is None:
      like = jax.tree.map(lambda x: x.copy(), state), space
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - start
    steps[name] = [compiled, state]
  seconds = {name: [] for name in configs}
  for _ in range(rounds + 1):  # the first round warms up
    for name, holder in steps.items():
      start = time.perf_counter()
      holder[1], metrics = holder[0](holder[1], batch)
      jax.block_until_ready(metrics['loss'])
      seconds[name].append(time.perf_counter() - start)
  return {
    name: {'compile_s': compile_s[name], 'step_ms': 1e3 * float(np.median(seconds[name][1:]))}
    for name in configs
  }


def mask_template(model, image_shape: tuple):
  """The super-network's mask template (ones, one leaf per searchable group), from shapes
  alone."""
  shapes = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0)}, jnp.zeros((1,) + tuple(image_shape)), train=False
    )
  )
  return jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes['masks'])


def mask_draw_seconds(template, impl: str, sampler, chunk: int, repeats: int) -> float:
  """Seconds to draw candidates 0..chunk-1 of ``template`` at p = 0.1 with the generator
  ``impl`` and ``sampler`` (``search.draw_candidates``, compiled, after one warm-up)."""
  key = jax.random.key(1, impl=impl)
  logits = masks.init_drop_logits(template, 0.1)
  indices = jnp.arange(chunk)
  return timed(lambda: search.draw_candidates(key, indices, logits, template, sampler), repeats)
