"""BatchNorm recalibration before scoring (search.bn_recalibration_batches)."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny

from pgnas_jax import masks, parallel, search
from pgnas_jax import space as space_lib
from pgnas_jax.supernets.shake_shake import ShakeShakeNet


def _setup(tiny_variables):
  """Trained-looking variables (JAX's normal draws), 8 candidates at p = 0.4, 3 calibration
  batches far from the trained statistics, and a batch to score."""
  count = len(jax.tree.leaves([tiny_variables['params'], tiny_variables['batch_stats']]))
  keys = iter(jax.random.split(jax.random.key(1), count))
  variables = tiny.trained_looking(
    tiny_variables, lambda shape: jax.random.normal(next(keys), shape)
  )
  space = space_lib.from_variables(tiny_variables)
  logits = masks.init_drop_logits(space.template, 0.4)
  cands = jax.device_get(
    masks.candidate_masks(jax.random.key(3), jnp.arange(8), logits, space.template)
  )
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  calibration = np.asarray(2.0 + 1.5 * jax.random.normal(k1, (3, 16, 8, 8, 2)))
  batch = {
    'images': jax.random.normal(k2, (12, 8, 8, 2)),
    'labels': jax.random.randint(k3, (12,), 0, 3),
    'weights': jnp.ones((12,)),
  }
  return variables, cands, calibration, batch


def _independent_statistics(variables, mask, calibration):
  """A plain forward in train mode per calibration batch (shake-shake off, so only
  BatchNorm differs from evaluation), its batch statistics read back from flax's running
  average update (new = 0.9 old + 0.1 batch), averaged over the batches."""
  net = ShakeShakeNet(
    num_classes=3, stem_width=4, widths=(4, 8), blocks_per_stage=1, kernel_sizes=(3, 3), shake=False
  )
  old = variables['batch_stats']
  per_batch = []
  for images in calibration:
    _, updates = net.apply(
      {**variables, 'masks': mask}, images, train=True, mutable=['batch_stats']
    )
    per_batch.append(jax.tree.map(lambda n, o: (n - 0.9 * o) / 0.1, updates['batch_stats'], old))
  return jax.tree.map(lambda *s: np.mean(np.stack(s), axis=0), *per_batch)


def test_recalibrated_scores_equal_an_independent_computation(tiny_net, tiny_variables):
  variables, cands, calibration, batch = _setup(tiny_variables)
  mesh = parallel.make_mesh(jax.devices()[:4])
  scorer = search.Scorer(tiny_net, mesh, 'float32')
  acc, loss = scorer.candidates(
    variables,
    cands,
    [parallel.put_replicated(batch, mesh)],
    parallel.put_replicated(calibration, mesh),
  )
  for c in (0, 5):
    mask = jax.tree.map(lambda m, c=c: m[c], cands)
    stats = _independent_statistics(variables, mask, calibration)
    out = tiny_net.apply(
      {**variables, 'batch_stats': stats, 'masks': mask}, batch['images'], train=False
    )
    ce = -jnp.take_along_axis(jax.nn.log_softmax(out), batch['labels'][:, None], 1)
    np.testing.assert_allclose(loss[c], float(jnp.mean(ce)), rtol=1e-4)
    assert round(acc[c] * 12) == int(jnp.sum(jnp.argmax(out, -1) == batch['labels']))
    # the winner's variables carry the same statistics
    recalibrated = scorer.recalibrated(variables, mask, parallel.put_replicated(calibration, mesh))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
      recalibrated['batch_stats'],
      stats,
    )
  # the calibration images are far from the trained statistics: recalibration matters
  assert not np.allclose(
    loss, scorer.candidates(variables, cands, [parallel.put_replicated(batch, mesh)])[1]
  )


def test_recalibrated_scores_do_not_depend_on_the_chunking(tiny_net, tiny_variables):
  variables, cands, calibration, batch = _setup(tiny_variables)
  results = []
  for n, chunk in ((1, 1), (4, 4), (4, 8)):
    mesh = parallel.make_mesh(jax.devices()[:n])
    scorer = search.Scorer(tiny_net, mesh, 'float32')
    placed, calib = parallel.put_replicated(batch, mesh), parallel.put_replicated(calibration, mesh)
    parts = [
      scorer.candidates(
        variables, jax.tree.map(lambda m, s=slice(i, i + chunk): m[s], cands), [placed], calib
      )
      for i in range(0, 8, chunk)
    ]
    results.append([np.concatenate([p[k] for p in parts]) for k in (0, 1)])
  for acc, loss in results[1:]:
    np.testing.assert_array_equal(acc, results[0][0])
    np.testing.assert_allclose(loss, results[0][1], rtol=1e-5)
