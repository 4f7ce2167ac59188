"""Candidate samplers (``search.sampler``) and generators (``rng.impl``): candidate c follows
from (search key, c) alone for every pair of them, the candidates' drop rates are the
posterior's p, a run resumes bitwise with every generator, and a changed sampler or
generator is noticed on resume."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import errors, masks, parallel, pipeline, records, resume, rng, samplers
from pgnas_jax import search, supernets, targets, train
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib

TEMPLATE = {'a': {'group0': jnp.ones(64)}, 'b': {'group0': jnp.ones(32), 'group1': jnp.ones(32)}}
P = {'a': {'group0': 0.1}, 'b': {'group0': 0.3, 'group1': 0.7}}
BLOCK = 16


def _logits():
  return jax.tree.map(lambda p: masks.logit(jnp.float32(p)), P)


def _sampler(name, block=BLOCK):
  return samplers.Sampler(name, block if name == 'stratified' else 0)


@pytest.mark.parametrize('impl', rng.IMPLEMENTATIONS)
@pytest.mark.parametrize('name', samplers.NAMES)
def test_candidate_depends_only_on_search_key_and_index(name, impl):
  # blocks of 4 and pairs straddle the chunks of 5
  sampler, key, logits = _sampler(name, 4), jax.random.key(4, impl=impl), _logits()
  draw = lambda k, idx: search.draw_candidates(k, idx, logits, TEMPLATE, sampler)
  whole = draw(key, jnp.arange(12))
  for first in range(0, 12, 5):  # as the search draws chunks: the last padded past 12
    part, n = draw(key, jnp.arange(first, first + 5)), min(5, 12 - first)
    jax.tree.map(
      lambda w, p: np.testing.assert_array_equal(w[first : first + n], p[:n]), whole, part
    )
  alone = search.candidate_mask(key, 7, logits, TEMPLATE, sampler)
  jax.tree.map(lambda w, a: np.testing.assert_array_equal(w[7], a), whole, alone)
  if name != 'mode':  # the mode follows from p alone
    other = draw(jax.random.key(5, impl=impl), jnp.arange(12))
    assert not np.array_equal(whole['a']['group0'], other['a']['group0'])
  if impl in rng.ONE_DEVICE_ONLY:
    return
  mesh = parallel.make_mesh(jax.devices()[:4])
  sharded = jax.jit(
    lambda k, idx: sampler(k, idx, logits, TEMPLATE), out_shardings=parallel.batch_sharded(mesh)
  )(key, jax.device_put(jnp.arange(12), parallel.batch_sharded(mesh)))
  jax.tree.map(lambda w, s: np.testing.assert_array_equal(w, np.asarray(s)), whole, sharded)


# The checks a sampler's candidates must pass, on 4,096 candidates x 32 to 64 channels, so
# >= 131,072 draws per group. Drop rate: for independent draws the standard error of a rate
# is sqrt(p (1 - p) / n) <= 0.0013 here; antithetic pairs and stratified blocks only lower
# it (negatively correlated draws), so a tolerance of 0.0065 is 5 standard errors, while the
# biased samplers below miss by 0.0125 to 0.05. Antithetic: in a pair both drop iff
# u < p and 1 - u < p, at rate max(0, 2p - 1), same tolerance (a pair sharing u drops both
# at rate p: off by >= 0.1). Stratified: in each block of 16 each channel drops in
# floor(16 p) or floor(16 p) + 1 candidates, exactly.
NUM = 4096
TOLERANCE = 0.0065


def _problems(name, drawn) -> list:
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(drawn)[0]:
    p = P[path[0].key][path[1].key]
    dropped = np.asarray(leaf) == 0
    where = f'{jax.tree_util.keystr(path)} (p {p})'
    if name == 'mode':
      if not np.all(dropped == (p >= 0.5)):
        problems.append(f'{where}: not the mode')
      continue
    if abs(dropped.mean() - p) > TOLERANCE:
      problems.append(f'{where}: drop rate {dropped.mean():.4f}')
    if name == 'antithetic':
      both = np.mean(dropped[0::2] & dropped[1::2])
      if abs(both - max(0.0, 2 * p - 1)) > TOLERANCE:
        problems.append(f'{where}: both of a pair drop at rate {both:.4f}')
    if name == 'stratified':
      counts = dropped.reshape(-1, BLOCK, dropped.shape[-1]).sum(1)
      if not np.all((counts == np.floor(BLOCK * p)) | (counts == np.floor(BLOCK * p) + 1)):
        problems.append(f'{where}: block counts {np.unique(counts).tolist()}')
  return problems


@pytest.mark.parametrize('name', samplers.NAMES)
def test_candidates_drop_each_channel_at_the_posterior_rate(name):
  drawn = search.draw_candidates(
    jax.random.key(2), jnp.arange(NUM), _logits(), TEMPLATE, _sampler(name)
  )
  assert set(np.unique(jax.tree.leaves(drawn)[0])) <= {0.0, 1.0}
  assert _problems(name, jax.device_get(drawn)) == []


def _antithetic_sharing_u(key, indices, drop_logits, template):
  draw = lambda c: masks.hard_mask(jax.random.fold_in(key, c // 2), drop_logits, template)
  return jax.vmap(draw)(indices)


def _stratified_without_jitter(key, indices, drop_logits, template):
  def draw(c):
    def leaf(k, channels):
      bits = jax.random.bits(k, (BLOCK, channels))
      return jnp.sum(bits < bits[c % BLOCK], axis=0).astype(jnp.float32) / BLOCK

    u = masks.leaf_draws(jax.random.fold_in(key, c // BLOCK), template, leaf)
    return masks.keep_where(u, drop_logits)

  return jax.vmap(draw)(indices)


def _iid_biased(key, indices, drop_logits, template):
  def draw(c):
    u = masks.uniforms(jax.random.fold_in(key, c), template)
    return masks.keep_where(jax.tree.map(lambda x: x**0.95, u), drop_logits)

  return jax.vmap(draw)(indices)


@pytest.mark.parametrize(
  'name, wrong',
  [
    ('antithetic', _antithetic_sharing_u),
    ('stratified', _stratified_without_jitter),
    ('iid', _iid_biased),
  ],
)
def test_the_checks_catch_a_wrong_sampler(name, wrong):
  drawn = jax.jit(wrong)(jax.random.key(2), jnp.arange(NUM), _logits(), TEMPLATE)
  assert _problems(name, jax.device_get(drawn))


def test_mode_is_one_candidate():
  assert _sampler('mode').num_candidates(100) == 1
  assert _sampler('stratified').num_candidates(100) == 100


def test_generators_offered_refused_and_one_device_only():
  config = config_lib.get_config()
  for impl in rng.IMPLEMENTATIONS:
    config.rng.impl = impl
    config_lib.validate(config)
    config_lib.validate_for_devices(config, 1)
  for impl in rng.REFUSED:
    config.rng.impl = impl
    with pytest.raises(errors.ConfigError, match='is not offered: under jax.vmap over keys') as e:
      config_lib.validate(config)
    assert '\n' not in str(e.value)
  for impl in rng.ONE_DEVICE_ONLY:
    config.rng.impl = impl
    with pytest.raises(errors.ConfigError, match='does not run on 2 devices: XLA cannot'):
      config_lib.validate_for_devices(config, 2)


def test_run_id_notices_the_generator_and_the_sampler():
  logits = {'a': np.float32(0.5)}
  variables = {'params': {'w': np.arange(6, dtype=np.float32)}, 'batch_stats': {}}
  data = jax.random.key_data(jax.random.key(3))
  ids = [
    records.run_id(jax.random.wrap_key_data(data, impl=impl), logits, variables, sampler)
    for impl in ('threefry2x32', 'philox4x32')  # the same key data, two generators
    for sampler in ('iid', 'antithetic', 'stratified/16', 'stratified/8')
  ]
  assert len(set(ids)) == len(ids)
  key = jax.random.key(3)
  assert records.run_id(key, logits, variables) == records.run_id(key, logits, variables, 'iid')


def _run_config(impl='threefry2x32', **search_fields):
  """A run of conftest's ``tiny_net`` on ``tiny.synthetic_dataset()`` with generator ``impl``:
  4 steps, a checkpoint every 2, 6 candidates, the ``search_fields`` given."""
  search = {'num_candidates': 6, 'chunk_size': 2, 'eval_batch_size': 8, **search_fields}
  return tiny.default_config(
    {
      **tiny.NET,
      'rng.impl': impl,
      'train.num_steps': 4,
      'train.log_every_steps': 2,
      'checkpoint.every_steps': 2,
      **{f'search.{k}': v for k, v in search.items()},
      'export.latency': False,
      'log.tensorboard': False,
    }
  )


@pytest.mark.parametrize('impl', rng.IMPLEMENTATIONS)
def test_training_stopped_and_resumed_is_bitwise_the_uninterrupted(tiny_net, tmp_path, impl):
  config = _run_config(impl)
  whole = tiny.trained(tiny_net, config, tmp_path / 'whole', tiny.StopAfter(0))[0]
  with pytest.raises(errors.Preempted, match='after training step 3'):
    tiny.trained(tiny_net, config, tmp_path / 'stopped', tiny.StopAfter(3))
  resumed = tiny.trained(tiny_net, config, tmp_path / 'stopped', tiny.StopAfter(0))[0]
  assert rng.impl_name(resumed.root_key) == impl
  for a, b in zip(jax.tree.leaves(jax.device_get(whole)), jax.tree.leaves(jax.device_get(resumed))):
    a, b = (
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (a, b)
    )
    np.testing.assert_array_equal(a, b)
  # a checkpoint of another generator is refused, not silently used with this one's keys
  other = 'philox4x32' if impl == 'threefry2x32' else 'threefry2x32'
  if jax.random.key_data(rng.root_key(0, other)).shape == jax.random.key_data(whole.root_key).shape:
    with pytest.raises(errors.CheckpointError, match='another run'):
      tiny.trained(tiny_net, _run_config(other), tmp_path / 'stopped', tiny.StopAfter(0))


def _recorded_by(workdir, config, count):
  """The dropped channels per group of candidates 0..count-1 that ``config``'s sampler draws
  from the trained state in ``workdir``'s last checkpoint, as search/candidates.jsonl
  records them."""
  model = supernets.build(config.model, 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)), train=False)
  space = space_lib.from_variables(variables)
  restored = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, 'checkpoints', '4', 'default')
  )
  root = jax.random.wrap_key_data(np.asarray(restored['root_key']), impl=config.rng.impl)
  logits = jax.tree.unflatten(
    jax.tree.structure(space.template), jax.tree.leaves(restored['params']['drop_logits'])
  )
  drawn = search.draw_candidates(
    train.purpose_key(root, 'search'),
    jnp.arange(count),
    logits,
    space.template,
    samplers.from_config(config.search, targets.channel_multiple(config, space.template)),
  )
  dropped = space_lib.kept_counts(space.template) - space_lib.kept_counts(jax.device_get(drawn))
  names = space_lib.group_names(space)
  return [dict(zip(names, row.tolist())) for row in dropped]


def test_another_sampler_scores_again_and_keeps_the_training(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(jax, 'devices', lambda *a: jax.local_devices()[:1])
  caplog.set_level(logging.INFO)
  workdir, dataset = str(tmp_path), tiny.synthetic_dataset()
  pipeline.run(_run_config(), workdir, dataset=dataset)
  iid = tiny.candidates(workdir)
  checkpoints = sorted(os.listdir(tmp_path / 'checkpoints'))
  assert [c['dropped'] for c in iid] == _recorded_by(workdir, _run_config(), 6)
  for name, count in (('antithetic', 6), ('mode', 1)):
    caplog.clear()
    config = _run_config(sampler=name, stratified_block=4)
    pipeline.run(config, workdir, dataset=dataset)
    assert 'the sampler changed: scoring the candidates again' in caplog.text
    assert 'written by another run' not in caplog.text  # not reported as damage
    assert 'resuming from the checkpoint at step 4' in caplog.text  # no training step again
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == checkpoints
    drawn = tiny.candidates(workdir)
    assert len(drawn) == count and {c['run'] for c in drawn}.isdisjoint({c['run'] for c in iid})
    assert [c['dropped'] for c in drawn] == _recorded_by(workdir, config, count)
    assert f'of {count} (no fine-tuning)' in (tmp_path / 'report.md').read_text()
  assert all(sum(c['dropped'].values()) == 0 for c in drawn)  # p near 0.1: the mode keeps all
  # the generator changes every result, like the seed: refused, nothing touched
  with pytest.raises(errors.IncompatibleWorkdirError, match='rng.impl'):
    pipeline.run(_run_config('threefry4x32', sampler='mode'), workdir, dataset=dataset)
  assert tiny.candidates(workdir) == drawn


def test_a_run_saved_before_the_generator_and_sampler_fields_resumes(tmp_path):
  """A config.json from before rng.impl and search.sampler existed ran as their defaults."""
  config = config_lib.get_config()
  saved = config.to_dict()
  del saved['rng'], saved['search']['sampler'], saved['search']['stratified_block']
  workdir_lib.write_json(str(tmp_path / 'config.json'), saved)
  resume.check_resumable(str(tmp_path), config)
  assert not resume.sampler_changed(str(tmp_path), config)
  config.search.stratified_block = 8  # no change of candidates while the sampler is iid
  assert not resume.sampler_changed(str(tmp_path), config)
  config.search.sampler = 'stratified'
  assert resume.sampler_changed(str(tmp_path), config)
  config.rng.impl = 'threefry4x32'
  with pytest.raises(errors.IncompatibleWorkdirError, match="rng.impl: 'threefry2x32' in the"):
    resume.check_resumable(str(tmp_path), config)
