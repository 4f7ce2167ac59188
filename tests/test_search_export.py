"""Vmapped candidate scoring, ranking, and export of the pruned winner."""

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import export, layers, masks, parallel, records, search
from pgnas_jax import space as space_lib


def _variables(tiny_variables, seed=1):
  """Trained-looking variables: random weights and non-trivial BatchNorm statistics."""
  leaves, treedef = jax.tree.flatten(
    {'params': tiny_variables['params'], 'batch_stats': tiny_variables['batch_stats']}
  )
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  v = jax.tree.unflatten(treedef, noisy)
  v['batch_stats'] = jax.tree.map(jnp.abs, v['batch_stats'])  # variances must be positive
  return v


def _batch(n=12, seed=2):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    'images': jax.random.normal(k1, (n, 8, 8, 2)),
    'labels': jax.random.randint(k2, (n,), 0, 3),
    'weights': jnp.ones((n,)),
  }


def test_vmapped_scoring_equals_python_loop(tiny_net, tiny_variables):
  variables = _variables(tiny_variables)
  space = space_lib.from_variables(tiny_variables)
  logits = masks.init_drop_logits(space.template, 0.4)
  cands = masks.candidate_masks(jax.random.key(3), jnp.arange(8), logits, space.template)
  batch = _batch()
  for mesh in (parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh(jax.devices()[:4])):
    correct, loss = search.make_chunk_scorer(tiny_net, mesh, 'float32')(
      variables, cands, parallel.put_replicated(batch, mesh)
    )
    for c in range(8):
      mask = jax.tree.map(lambda m: m[c], cands)
      out = tiny_net.apply({**variables, 'masks': mask}, batch['images'], train=False)
      ce = -jnp.take_along_axis(jax.nn.log_softmax(out), batch['labels'][:, None], 1)
      np.testing.assert_allclose(float(loss[c]), float(jnp.sum(ce)), rtol=1e-5)
      assert int(correct[c]) == int(jnp.sum(jnp.argmax(out, -1) == batch['labels']))


def test_evaluate_ignores_padding(tiny_net, tiny_variables):
  variables = _variables(tiny_variables)
  mesh = parallel.make_mesh(jax.devices()[:1])
  scorer = search.make_full_scorer(tiny_net, mesh, 'float32')
  batch = _batch(12)
  whole = search.evaluate(scorer, (variables,), [batch])
  padded = dict(batch, weights=batch['weights'].at[8:].set(0.0))
  part = search.evaluate(scorer, (variables,), [padded])
  first8 = search.evaluate(scorer, (variables,), [{k: v[:8] for k, v in batch.items()}])
  np.testing.assert_allclose(part, first8, rtol=1e-6)
  assert whole != part


def test_winner_is_best_validation_accuracy_ties_fewer_params():
  records = [
    {'index': 0, 'val_acc': 0.9, 'params': 50},
    {'index': 1, 'val_acc': 0.95, 'params': 70},
    {'index': 2, 'val_acc': 0.95, 'params': 60},
    {'index': 3, 'val_acc': 0.95, 'params': 60},
  ]
  assert search.choose_winner(records)['index'] == 2


def test_pruned_network_logits_equal_masked_supernet(tiny_net, tiny_variables):
  variables = _variables(tiny_variables)
  space = space_lib.from_variables(tiny_variables)
  logits = masks.init_drop_logits(space.template, 0.5)
  mask = masks.hard_mask(jax.random.key(4), logits, space.template)
  # force one convolution to lose every input: it must be removed
  mask['stage1_block0']['branch1']['conv1']['group0'] = jnp.zeros(8)
  images = _batch()['images']
  masked = tiny_net.apply({**variables, 'masks': mask}, images, train=False)
  pruned = export.pruned_variables(variables, space, mask)
  for round_trip in (False, True):
    v = pruned
    if round_trip:
      export.save_weights('/tmp/pgnas_test_pruned.msgpack', pruned)
      v = export.load_weights('/tmp/pgnas_test_pruned.msgpack')
    out = tiny_net.apply(v, images, train=False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(masked), rtol=1e-5, atol=1e-5)
  kernel = pruned['params']['stage1_block0']['branch1']['conv1']['kernel']
  assert kernel.shape[2] == 0
  kept0 = int(mask['stage0_block0']['branch0']['conv0']['group0'].sum())
  assert pruned['params']['stage0_block0']['branch0']['conv0']['kernel'].shape[2] == kept0
  desc = export.describe(space, mask, pruned)
  assert desc['removed_convs'] == ['stage1_block0/branch1/conv1']
  assert desc['params'] == space_lib.count_params(pruned['params'])
  # the full network's cost equals the super-network's parameter count
  full_params, full_macs = space_lib.costs(space, space.template)
  assert full_params == space_lib.count_params(tiny_variables['params'])
  assert desc['params'] < full_params and desc['flops'] < full_macs


def test_macs_of_full_network_match_hand_count(tiny_variables):
  # 8x8 input, 2 channels; stem 3x3x2->4; stage0 (8x8): 2 branches x (3x3x4->4, 3x3x4->4);
  # stage1 (4x4, stride 2): 2 branches x (3x3x4->8, 3x3x8->8), shortcut 2 x (1x1x4->4) on 4x4;
  # classifier 8->3.
  expected = (
    64 * 9 * 2 * 4 + 2 * 2 * 64 * 9 * 4 * 4 + 2 * 16 * 9 * (4 * 8 + 8 * 8) + 2 * 16 * 4 * 4 + 8 * 3
  )
  space = space_lib.from_variables(tiny_variables)
  assert int(space_lib.costs(space, space.template)[1]) == expected


def test_group_sq_norms_follow_group_order():
  import flax.linen as nn

  class Split(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.SearchableConv(2, 1, groups=(1, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1), name='c')(x)

  v = Split().init(jax.random.key(0), jnp.zeros((1, 2, 2, 14)))
  norms = layers.group_sq_norms(v['params'], v['masks'])
  k = np.asarray(v['params']['c']['kernel'])
  np.testing.assert_allclose(norms['c']['group2'], np.sum(k[:, :, 3:6] ** 2), rtol=1e-6)
  np.testing.assert_allclose(norms['c']['group10'], np.sum(k[:, :, 13:14] ** 2), rtol=1e-6)


def test_recorded_candidates_drop_a_partly_written_last_line(tmp_path, caplog):
  path = tmp_path / 'candidates.jsonl'
  lines = [
    records.to_line(records.make('run', i, (0.5, 1.0), (10, 20), {'g': 0})) for i in range(3)
  ]
  path.write_text(''.join(lines) + '{"index": 3, "val_a')
  recorded = records.resume(str(path), 'run')
  assert [r['index'] for r in recorded] == [0, 1, 2]
  assert path.read_text() == ''.join(lines)  # the fragment is gone from the file too
  # out of order: no longer an error that sends the user to --start_over, but cut back
  path.write_text(lines[0] + lines[2])
  assert [r['index'] for r in records.resume(str(path), 'run')] == [0]
  assert 'line 2 holds candidate 2 where 1 belongs' in caplog.text
  assert path.read_text() == lines[0]
  assert records.resume(str(tmp_path / 'absent.jsonl'), 'run') == []


def test_auto_chunk_size_aims_at_the_platform_target_within_free_memory(
  tiny_net, tiny_variables, monkeypatch
):
  variables = _variables(tiny_variables)
  space = space_lib.from_variables(tiny_variables)
  target = search.IMAGES_PER_CALL['cpu'] // 16  # candidates per device for batches of 16
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    batch = parallel.put_replicated(_batch(16), mesh)
    auto = lambda c: search.Scorer(tiny_net, mesh, 'float32').auto_chunk_size(
      variables, space, batch, c
    )
    assert auto(1000) == n * target == auto(1000)  # deterministic
    assert auto(5) == n * -(-5 // n)  # no more than the candidates need, a multiple of n
  # with room for about 3 candidates' activations, it takes 3
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = parallel.put_replicated(_batch(16), mesh)
  scorer = search.make_chunk_scorer(tiny_net, mesh, 'float32')
  temporaries = {}
  for k in (1, 2):
    masks_k = jax.tree.map(lambda m: np.ones((k,) + m.shape, np.float32), space.template)
    temporaries[k] = (
      scorer.lower(variables, masks_k, batch).compile().memory_analysis().temp_size_in_bytes
    )
  room = 3.5 * (temporaries[2] - temporaries[1]) / search.MEMORY_SHARE
  monkeypatch.setattr(search, '_free_memory_bytes', lambda device: int(room))
  assert (
    search.Scorer(tiny_net, mesh, 'float32').auto_chunk_size(variables, space, batch, 1000) == 3
  )
  monkeypatch.setattr(search, '_free_memory_bytes', lambda device: 0)
  assert (
    search.Scorer(tiny_net, mesh, 'float32').auto_chunk_size(variables, space, batch, 1000) == 1
  )
