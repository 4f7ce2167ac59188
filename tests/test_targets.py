"""Cost targets (SPEC section 7): the expected cost is the candidates' mean cost, the
projection holds it at its ceiling, training follows the ramp to the target on any device
count and resumes bitwise, the search's budget defaults to the target, and bad targets are
refused in one line before the workdir exists. Channel blocks (``search.channel_multiple``):
widths in multiples, blocks dropped whole with their group's probability. Starting from
weights trained before (``train.init_from``) in every form, and refusing another network's."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny

from pgnas_jax import budget, compact, errors, masks, parallel, pipeline, samplers, supernets
from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import targets, train
from pgnas_jax import config as config_lib
from pgnas_jax import space as space_lib


@pytest.fixture(scope='module')
def space(tiny_variables):
  return space_lib.from_variables(tiny_variables)


def _config(steps=12, **objective):
  """``steps`` steps of conftest's ``tiny_net`` with the default (weak) regulariser, which
  leaves the drop probabilities to the target, and the ``objective`` fields given."""
  c = tiny.default_config({**tiny.NET, 'train.num_steps': steps})
  c.objective.update(objective)
  config_lib.validate(c)
  return c


def _logits(space, seed=0):
  leaves, treedef = jax.tree.flatten(space.template)
  values = jax.random.normal(jax.random.key(seed), (len(leaves),)) * 1.5 - 1.0
  return jax.tree.unflatten(treedef, [v for v in values])


def test_expected_cost_is_the_mean_cost_of_the_posterior_candidates(space):
  """E[C] against 20,000 candidates drawn as the search draws them; the tolerance is four
  standard errors of their mean (a formula with p for 1 - p is off by over 100 of them)."""
  logits = _logits(space)
  found = targets.from_config(_config(target_params=0.9, target_flops=0.9), space, 10)
  drawn = masks.candidate_masks(jax.random.key(1), jnp.arange(20_000), logits, space.template)
  for cost, sampled in zip(found.costs, space_lib.costs(space, jax.device_get(drawn))):
    error = 4 * np.std(sampled) / np.sqrt(len(sampled))
    assert abs(float(cost.expected(logits)) - np.mean(sampled)) < error, cost.kind
    full = space_lib.costs(space, space.template)[targets.KINDS.index(cost.kind)]
    assert cost.full == full and float(cost.expected(jax.tree.map(lambda t: t - 50, logits))) == (
      pytest.approx(full, rel=1e-6)
    )


def test_projection_meets_the_tighter_ceiling_and_leaves_a_slack_one_alone(space):
  logits = _logits(space, seed=2)
  held = targets.from_config(_config(target_params=0.4, target_flops=0.6), space, 10)
  at_end = jnp.int32(10)  # past the ramp: the ceilings are the targets
  shifted, metrics = held.project(logits, at_end)
  shares = {c.kind: float(c.expected(shifted)) / c.full for c in held.costs}
  ceilings = {c.kind: c.target / c.full for c in held.costs}
  assert float(metrics['target_shift']) > 0
  assert max(s - ceilings[k] for k, s in shares.items()) == pytest.approx(0.0, abs=1e-5)
  assert all(shares[k] <= ceilings[k] + 1e-6 for k in shares)
  for k in shares:
    assert float(metrics[f'expected_{k}']) == pytest.approx(shares[k], rel=1e-6)
  loose = targets.from_config(_config(target_params=0.99), space, 10)
  same, metrics = loose.project(logits, at_end)
  assert float(metrics['target_shift']) == 0.0
  jax.tree.map(np.testing.assert_array_equal, same, logits)


def test_the_ceiling_falls_from_the_initial_posterior_to_the_target_over_the_ramp(space):
  held = targets.from_config(_config(target_flops=0.5, target_ramp=0.25), space, 40)
  (cost,) = held.costs
  initial = masks.init_drop_logits(space.template, 0.1)
  assert float(cost.expected(initial)) == pytest.approx(cost.start, rel=1e-6)
  ceilings = [float(cost.ceiling(jnp.int32(s), held.ramp_steps)) for s in (0, 5, 10, 40)]
  assert ceilings == pytest.approx(
    [cost.start, (cost.start + cost.target) / 2, cost.target, cost.target], rel=1e-6
  )


def test_training_holds_the_target_on_one_and_four_devices_alike(tiny_net):
  """Each step's expected FLOPs at or under its ceiling; at the end within 5% of the target
  (the Done-when of issue 28, here on the tiny network); one and four devices agree."""
  config = _config(steps=12, target_flops=0.5)
  runs = {}
  for n in (1, 4):
    steps = tiny.Stepper(tiny_net, config, jax.devices()[:n])
    runs[n] = steps(steps.state, 0, 12)
  for m in runs[1][1]:
    assert m['expected_flops'] <= m['target_flops'] + 1e-6
  last = runs[1][1][-1]
  assert last['target_flops'] == pytest.approx(0.5, abs=1e-3)  # the ceiling's rounding
  assert 0.475 <= last['expected_flops'] <= 0.5 + 1e-6
  assert sum(m['target_shift'] > 0 for m in runs[1][1]) >= 6  # the target did the pruning
  for a, b in zip(jax.tree.leaves(runs[1][0].drop_logits), jax.tree.leaves(runs[4][0].drop_logits)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)
  # candidates of the steered posterior, in the run's channel blocks ('auto': 4 here), come
  # out the same in any chunking (SPEC section 3)
  logits, template = runs[1][0].drop_logits, steps.space.template
  multiple = targets.channel_multiple(config, template)
  sampler = samplers.from_config(config.search, multiple)
  assert multiple == 4
  whole = sampler(jax.random.key(9), jnp.arange(6), logits, template)
  for first in range(0, 6, 4):
    part = sampler(jax.random.key(9), jnp.arange(first, min(first + 4, 6)), logits, template)
    jax.tree.map(lambda w, p: np.testing.assert_array_equal(w[first : first + 4], p), whole, part)


def test_a_steered_run_stopped_and_resumed_is_bitwise_the_uninterrupted(tiny_net, tmp_path):
  config = tiny.default_config(
    {
      **tiny.NET,
      'train.num_steps': 6,
      'checkpoint.every_steps': 2,
      'objective.target_params': 0.6,
      'objective.target_ramp': 0.5,
      'log.tensorboard': False,
    }
  )
  whole = tiny.trained(tiny_net, config, tmp_path / 'whole', tiny.StopAfter(0))[0]
  with pytest.raises(errors.Preempted, match='after training step 2'):
    tiny.trained(tiny_net, config, tmp_path / 'stopped', tiny.StopAfter(2))
  resumed = tiny.trained(tiny_net, config, tmp_path / 'stopped', tiny.StopAfter(0))[0]
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_search_budget_defaults_to_the_target():
  c = tiny.default_config({'objective.target_flops': 0.5, 'objective.target_params': 1000})
  assert budget.Budget.from_config(c, 4000, 1_000_000) == budget.Budget(1000, 500_000)
  c.search.max_flops = '25%'  # a budget set for the search wins
  assert budget.Budget.from_config(c, 4000, 1_000_000) == budget.Budget(1000, 250_000)


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'objective.target_flops': -1}, 'objective.target_flops=-1 is out of range'),
    ({'objective.target_params': '150%'}, "objective.target_params='150%' is out of range"),
    ({'objective.target_params': 1.5}, 'objective.target_params=1.5 is out of range'),
    ({'objective.target_ramp': 2.0}, 'objective.target_ramp=2.0 is out of range'),
  ],
)
def test_a_target_out_of_range_is_refused(fields, message):
  with pytest.raises(errors.ConfigError, match=message.replace('(', r'\(')):
    config_lib.validate(tiny.default_config(fields))


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'objective.target_params': 10}, 'asks for 10 params, but the layers no search can remove'),
    ({'objective.target_flops': 0.5, 'drop.mode': 'random'}, "which drop.mode='random' freezes"),
  ],
)
def test_an_unreachable_target_is_refused_before_the_workdir_exists(tmp_path, fields, message):
  with pytest.raises(errors.ConfigError, match=message):
    pipeline.run(tiny.config(fields), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('family', ['shake_shake', 'densenet'])
def test_channel_blocks_give_compact_widths_in_multiples(family):
  """With ``channel_multiple=4`` every kept group width is a multiple of 4, and so is every
  conv width of the compact network (the image channels and class count aside); the compact
  logits still equal the masked super-network's."""
  model, _, variables, space, images = tiny.family_case(family)
  logits = masks.init_drop_logits(space.template, 0.4)
  sampler = samplers.Sampler(channel_multiple=4)
  drawn = jax.device_get(sampler(jax.random.key(3), jnp.arange(8), logits, space.template))
  assert all(np.all(m.sum(-1) % 4 == 0) for m in jax.tree.leaves(drawn))
  assert any(np.any((m.sum(-1) > 0) & (m.sum(-1) < m.shape[-1])) for m in jax.tree.leaves(drawn))
  for c in range(8):
    mask = jax.tree.map(lambda m: m[c], drawn)
    net = compact.build(model, variables, mask, images.shape[1:])
    out = jax.jit(compact.inference_fn(net))(net.weights, images)
    masked = tiny.apply(model, {**variables, 'masks': mask}, images)
    np.testing.assert_allclose(np.asarray(out), np.asarray(masked), rtol=1e-5, atol=1e-5)
    for path, w in jax.tree_util.tree_flatten_with_path(net.weights)[0]:
      if w.ndim == 4:  # conv kernels: inputs (but the image's) and outputs
        widths = [w.shape[3]] + ([w.shape[2]] if w.shape[2] != images.shape[-1] else [])
      elif w.ndim == 2:  # the classifier: its inputs
        widths = [w.shape[0]]
      else:
        continue
      assert all(n % 4 == 0 for n in widths), (c, path, w.shape)


def test_a_block_is_dropped_whole_with_its_groups_probability():
  """4,000 candidates of one group of 32 channels at p = 0.3 in blocks of 8: each block is
  all kept or all dropped, dropped in 0.3 of the draws (16,000 block draws: standard error
  0.0036, tolerance 0.015)."""
  template = {'g': jnp.ones(32)}
  logits = masks.init_drop_logits(template, 0.3)
  sampler = samplers.Sampler(channel_multiple=8)
  drawn = np.asarray(sampler(jax.random.key(0), jnp.arange(4000), logits, template)['g'])
  blocks = drawn.reshape(4000, 4, 8)
  assert np.all(blocks.min(-1) == blocks.max(-1))
  assert abs(np.mean(blocks[..., 0] == 0) - 0.3) < 0.015
  assert sampler.id == 'iid x8' and samplers.Sampler().id == 'iid'


def test_a_multiple_that_does_not_divide_a_group_is_refused_before_the_workdir(tmp_path):
  config = tiny.config({'search.channel_multiple': 8})  # the tiny net's first groups have 4
  with pytest.raises(errors.ConfigError, match='channel_multiple=8 does not divide the 4 input'):
    pipeline.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_auto_channel_multiple_is_one_without_a_target_and_up_to_16_with_one():
  template = {'a': jnp.ones(16), 'b': jnp.ones(64)}
  config = config_lib.get_config()
  assert config.search.channel_multiple == 'auto'
  assert targets.channel_multiple(config, template) == 1  # the paper's search
  config.objective.target_flops = 0.5
  assert targets.channel_multiple(config, template) == 16
  for width, multiple in ((24, 8), (12, 4), (10, 2), (7, 1)):
    assert targets.channel_multiple(config, {**template, 'c': jnp.ones(width)}) == multiple
  config.search.channel_multiple = 4  # a number is kept, target or not
  assert targets.channel_multiple(config, template) == 4


def test_a_steered_run_in_channel_blocks_end_to_end(tmp_path):
  """The main job with a FLOPs target and the default ``channel_multiple`` ('auto': blocks
  of 4, the tiny network's narrowest groups): training logs the expected cost and plots it,
  the winner fits the target, and arch.json and the compact network keep widths in
  multiples of 4, candidates being cut in blocks (some width strictly between 0 and full)."""
  config = tiny.config({'objective.target_flops': 0.6, 'train.num_steps': 8})
  result = pipeline.run(config, str(tmp_path))
  metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['expected_flops'] <= metrics[-1]['target_flops'] + 1e-6
  assert (tmp_path / 'plots' / 'training.png').exists()
  arch = result.arch
  assert arch['flops'] <= arch['budget']['max_flops'] == int(0.6 * arch['supernet']['flops'])
  assert all(len(kept) % 4 == 0 for kept in arch['kept_channels'].values())
  dropped = [c['dropped'] for c in tiny.candidates(tmp_path)]
  assert all(n % 4 == 0 for c in dropped for n in c.values())
  assert any(c['stage1_block0/branch0/conv1/group0'] == 4 for c in dropped)  # half of 8
  weights = np.load(tmp_path / 'search' / 'winner_compact.npz')
  for name in weights.files:
    w = weights[name]
    if w.ndim == 4 and w.shape[2] != 1:  # every conv but the stem, reading the image
      assert w.shape[2] % 4 == 0 and w.shape[3] % 4 == 0, (name, w.shape)


def _started(model, config, workdir):
  """The state ``train.resume`` starts a run from in an empty ``workdir``."""
  dataset, mesh = tiny.synthetic_dataset(), parallel.make_mesh(jax.devices()[:1])
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), config.checkpoint)
  try:
    return train.resume(model, config, dataset, mesh, checkpointer)[0]
  finally:
    checkpointer.close()


@pytest.mark.parametrize('form', ['msgpack', 'npz', 'npz_params_only', 'orbax'])
def test_a_run_starts_from_weights_trained_before(tiny_net, tmp_path, form):
  """``train.init_from`` in each form a user has: the run's first state holds those weights
  (and BatchNorm statistics, where the file has them), and its own initial drop logits."""
  config = _config(steps=4)
  before, _ = tiny.trained(tiny_net, config, tmp_path / 'before')  # weights that moved
  variables = jax.device_get(before.variables)
  path = str(tmp_path / f'weights.{form[:3] if form.startswith("npz") else form}')
  if form == 'msgpack':
    with open(path, 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(variables))
  elif form == 'npz':
    np.savez(path, **flax.traverse_util.flatten_dict(variables, sep='/'))
  elif form == 'npz_params_only':
    np.savez(path, **flax.traverse_util.flatten_dict(variables['params'], sep='/'))
  else:
    path = str(tmp_path / 'before' / 'checkpoints' / '4')
  config.train.init_from = path
  started = _started(tiny_net, config, tmp_path / 'after')
  jax.tree.map(np.testing.assert_array_equal, started.variables['params'], variables['params'])
  stats = jax.device_get(started.batch_stats)
  if form == 'npz_params_only':  # the model's initial statistics
    fresh = _started(tiny_net, _config(steps=4), tmp_path / 'fresh')
    jax.tree.map(np.testing.assert_array_equal, stats, jax.device_get(fresh.batch_stats))
  else:
    jax.tree.map(np.testing.assert_array_equal, stats, variables['batch_stats'])
  initial = masks.init_drop_logits(jax.device_get(started.drop_logits), 0.1)
  jax.tree.map(np.testing.assert_allclose, jax.device_get(started.drop_logits), initial)
  assert int(started.step) == 0


@pytest.mark.parametrize(
  'write, message',
  [
    (
      lambda path, variables: np.savez(path, **{'params/stem/kernel': np.zeros((3, 3, 1, 8))}),
      r'holds another network: params/stem/kernel is 3x3x1x8 there, 3x3x1x4 in this network',
    ),
    (
      lambda path, variables: np.savez(
        path, **flax.traverse_util.flatten_dict(variables['params'], sep='/'), extra=np.zeros(1)
      ),
      'holds another network: this network has no params/extra',
    ),
    (lambda path, variables: open(path, 'wb').write(b'PK\x03\x04 cut'), 'cannot be read'),
    (lambda path, variables: None, 'no such file or folder'),
  ],
)
def test_weights_of_another_network_are_refused_before_the_workdir(tmp_path, write, message):
  config = tiny.config()
  model = supernets.build(config.model, 10)
  images = jnp.zeros((1, 28, 28, 1))
  variables = jax.device_get(model.init({'params': jax.random.key(0)}, images, train=False))
  path = str(tmp_path / 'weights.npz')
  write(path, variables)
  config.train.init_from = path
  with pytest.raises(errors.ConfigError, match=message):
    pipeline.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
