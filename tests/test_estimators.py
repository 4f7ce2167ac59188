"""Gate estimators (``drop.estimator``) and the temperature schedule (``drop.final_tau``):
the concrete masks are those from before the estimators, bit for bit; hard concrete's atoms
have the analytic probabilities; straight-through is hard forward with the concrete's logit
gradient; DisARM's logit gradient is unbiased on a function small enough to enumerate (and a
wrong variant is caught); every estimator trains a step reproducibly, with the ablations, on
any device count; the schedule is step-indexed, so a resumed run keeps it."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import errors, estimators, masks, parallel, resume
from pgnas_jax import workdir as workdir_lib

TEMPLATE = {'a': {'group0': jnp.ones(50)}, 'b': {'group0': jnp.ones(50), 'group1': jnp.ones(50)}}
P = {'a': {'group0': 0.1}, 'b': {'group0': 0.5, 'group1': 0.8}}


def _dot(weights, tree):
  """sum over leaves of sum(weights * leaf)."""
  return sum(jnp.sum(w * x) for w, x in zip(jax.tree.leaves(weights), jax.tree.leaves(tree)))


def _logits(p=P):
  return jax.tree.map(lambda q: masks.logit(jnp.float32(q)), p)


def _masks(name, key, batch, tau):
  """The masks estimator ``name`` trains on at P (the loss returns them as its aux)."""
  noise = masks.logistic_noise(key, TEMPLATE, batch)
  return estimators.ESTIMATORS[name](lambda t, m: (0.0, m), _logits(), noise, tau, True)[1]


def test_concrete_masks_are_those_from_before_the_estimators():
  """The relaxed masks as they were drawn before issue 13, written out per group: group i
  draws its logistic noise from fold_in(key, i) and keeps 1 - sigmoid((theta + noise) / tau)."""
  key, logits, tau = jax.random.key(3), _logits(), 0.2
  drawn = jax.jit(lambda k: _masks('concrete', k, 16, tau))(key)
  for i, (theta, leaf) in enumerate(zip(jax.tree.leaves(logits), jax.tree.leaves(drawn))):
    noise = jax.random.logistic(jax.random.fold_in(key, i), (16, 50))
    np.testing.assert_array_equal(leaf, 1.0 - jax.nn.sigmoid((theta + noise) / tau))
  for a, b in zip(
    jax.tree.leaves(drawn), jax.tree.leaves(masks.relaxed_masks(key, logits, TEMPLATE, 16, tau))
  ):
    np.testing.assert_array_equal(a, b)


# Rates below are over 4,000 examples x 50 channels = 200,000 gates per group; the standard
# error of a rate q is sqrt(q (1 - q) / 200,000) <= 0.0011, and every check allows 5 of them.
BATCH = 4000


def _tolerance(q):
  return 5 * np.sqrt(q * (1 - q) / (BATCH * 50))


@pytest.mark.parametrize('tau', [0.2, 0.5])
def test_hard_concrete_masks_hit_0_and_1_at_their_analytic_rates(tau):
  drawn = jax.jit(lambda k: _masks('hard_concrete', k, BATCH, tau))(jax.random.key(1))
  for p, leaf in zip(jax.tree.leaves(P), jax.tree.leaves(drawn)):
    leaf = np.asarray(leaf)
    assert leaf.min() == 0.0 and leaf.max() == 1.0
    theta = np.log(p) - np.log1p(-p)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    zero, one = sigmoid(theta - tau * np.log(11)), sigmoid(-theta - tau * np.log(11))
    assert abs(np.mean(leaf == 0) - zero) < _tolerance(zero), (p, tau)
    assert abs(np.mean(leaf == 1) - one) < _tolerance(one), (p, tau)
    # the check tells this gate from one that is exactly 0 with probability p
    assert abs(np.mean(leaf == 0) - p) > _tolerance(p)


def test_straight_through_is_hard_forward_with_the_concretes_logit_gradient():
  key, tau = jax.random.key(2), 0.2
  drawn = jax.jit(lambda k: _masks('straight_through', k, BATCH, tau))(key)
  noise = masks.logistic_noise(key, TEMPLATE, BATCH)
  for p, theta, n, leaf in zip(
    jax.tree.leaves(P), jax.tree.leaves(_logits()), jax.tree.leaves(noise), jax.tree.leaves(drawn)
  ):
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(leaf, (theta + n <= 0).astype(np.float32))  # exactly 0 or 1
    assert abs(np.mean(leaf == 0) - p) < _tolerance(p)
  # a loss linear in the mask: its logit gradient is the mask's Jacobian, the concrete's
  weights = jax.tree.map(lambda m: jax.random.normal(jax.random.key(5), (8, m.shape[0])), TEMPLATE)
  small = masks.logistic_noise(key, TEMPLATE, 8)

  def logit_gradient(name):
    estimate = estimators.ESTIMATORS[name]
    return jax.jit(
      jax.grad(lambda t: estimate(lambda _, m: (_dot(weights, m), None), t, small, tau, True)[0])
    )(_logits())

  for a, b in zip(
    jax.tree.leaves(logit_gradient('concrete')), jax.tree.leaves(logit_gradient('straight_through'))
  ):
    assert a != 0
    np.testing.assert_array_equal(a, b)


# DisARM on a function small enough to enumerate: groups of 1 and 2 channels, batch 2, so 6
# Bernoulli gates and 64 masks. f is nonlinear in the mask and has a term in theta alone (as
# the regulariser), whose gradient must pass exactly.
SMALL = {'a': jnp.ones(1), 'b': jnp.ones(2)}
SMALL_P = {'a': 0.2, 'b': 0.7}
C1 = {'a': jnp.array([[1.5], [-0.5]]), 'b': jnp.array([[0.8, -1.2], [0.3, 2.0]])}
C2 = {'a': jnp.array([[0.7], [1.1]]), 'b': jnp.array([[-0.9, 0.4], [1.3, -0.6]])}
DRAWS = 20000


def _f(theta, keep):
  extra = 0.1 * sum(jnp.square(t) for t in jax.tree.leaves(theta))
  return jnp.square(_dot(C1, keep)) + jnp.sin(3.0 * _dot(C2, keep)) + extra, None


def _exact_gradient(theta):
  """d/dtheta of E[f] over every one of the 64 keep masks."""

  def expected(theta):
    p = jax.tree.map(jax.nn.sigmoid, theta)
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=6):
      keep = {'a': jnp.array(bits[:2]).reshape(2, 1), 'b': jnp.array(bits[2:]).reshape(2, 2)}
      prob = jnp.prod(
        jnp.concatenate([jnp.where(keep[g] == 1, 1 - p[g], p[g]).ravel() for g in ('a', 'b')])
      )
      total = total + prob * _f(theta, keep)[0]
    return total

  return jax.grad(expected)(theta)


def _estimates(name, theta, tau=0.2):
  """The estimator's logit gradient on DRAWS keys, leaves shape (DRAWS,)."""

  def one(key):
    noise = masks.logistic_noise(key, SMALL, 2)
    return jax.grad(lambda t: estimators.ESTIMATORS[name](_f, t, noise, tau, True)[0])(theta)

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(DRAWS))
  return jax.jit(jax.vmap(one))(keys)


def _within(estimates, exact, standard_errors) -> bool:
  """Every group's mean estimate within ``standard_errors`` of its exact gradient."""
  return all(
    abs(np.mean(e) - x) < standard_errors * np.std(e) / np.sqrt(len(e))
    for e, x in zip(jax.tree.leaves(estimates), jax.tree.leaves(exact))
  )


# With 20,000 draws the mean of an unbiased estimate is within 4 standard errors of the exact
# gradient with probability 1 - 6e-5 per group (normal approximation; the estimates are
# bounded, so it applies); the keys are fixed, so the test is deterministic.
def test_disarm_logit_gradient_is_unbiased_and_a_wrong_sign_is_caught(monkeypatch):
  theta = jax.tree.map(lambda q: masks.logit(jnp.float32(q)), SMALL_P)
  exact = _exact_gradient(theta)
  assert all(abs(float(x)) > 0.05 for x in jax.tree.leaves(exact))
  assert _within(_estimates('disarm', theta), exact, 4)
  # without the sign term (-1)^{d~} the flips' contributions cancel: biased, and caught
  monkeypatch.setattr(
    estimators,
    'disarm_weight',
    lambda t, d, a: jax.nn.sigmoid(jnp.abs(t)) * jnp.sum(jnp.abs(d - a)),
  )
  assert not _within(_estimates('disarm', theta), exact, 4)


def test_disarm_trains_the_weights_on_its_hard_sample():
  key, logits = jax.random.key(4), _logits()
  noise = masks.logistic_noise(key, TEMPLATE, 8)
  ones = jax.tree.map(lambda n: jnp.ones_like(n), noise)
  value, keep = estimators.ESTIMATORS['disarm'](
    lambda t, m: (_dot(ones, m), m), logits, noise, 0.2, True
  )
  hard = jax.tree.map(lambda t, n: (t + n <= 0).astype(jnp.float32), logits, noise)
  for a, b in zip(jax.tree.leaves(keep), jax.tree.leaves(hard)):
    np.testing.assert_array_equal(a, b)
  assert value == _dot(ones, hard)  # the loss of that sample


def test_concrete_bias_shrinks_as_tau_falls():
  theta = jax.tree.map(lambda q: masks.logit(jnp.float32(q)), SMALL_P)
  exact = np.array(jax.tree.leaves(_exact_gradient(theta)))
  bias = []
  for tau in (1.0, 0.3, 0.1):
    mean = np.array([np.mean(e) for e in jax.tree.leaves(_estimates('concrete', theta, tau))])
    bias.append(np.linalg.norm(mean - exact))
  assert bias[0] > bias[1] > bias[2], bias


def test_temperature_schedule():
  drop = config_lib.get_config().drop
  assert estimators.temperature(drop, 100)(jnp.int32(57)) == drop.tau  # constant by default
  drop.tau, drop.final_tau = 0.5, 0.05
  tau = estimators.temperature(drop, 101)
  assert float(tau(jnp.int32(0))) == pytest.approx(0.5, rel=1e-6)
  assert float(tau(jnp.int32(50))) == pytest.approx(np.sqrt(0.5 * 0.05), rel=1e-6)  # geometric
  assert float(tau(jnp.int32(100))) == pytest.approx(0.05, rel=1e-6)
  assert float(estimators.temperature(drop, 1)(jnp.int32(0))) == pytest.approx(0.5)


NUM_STEPS = 4  # the run's length, which the temperature schedule spans


@pytest.mark.parametrize('mode, prior', [('learned', 'posterior'), ('random', 'constant')])
@pytest.mark.parametrize('name', estimators.NAMES)
def test_a_train_step_with_each_estimator_is_finite_and_reproducible(tiny_net, name, mode, prior):
  config = tiny.steps_config(NUM_STEPS, estimator=name, mode=mode, init_p=0.2, random_p=0.3)
  config.objective.prior = prior
  steps = tiny.Stepper(tiny_net, config, jax.devices()[:1])
  before = jax.device_get(steps.state.params['drop_logits'])
  (a, history), (b, _) = steps(steps.state, 0, 1), steps(steps.fresh(), 0, 1)
  a, b = jax.device_get(a.params), jax.device_get(b.params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(history[0][k]) for k in ('loss', 'grad_norm'))
  moved = [
    float(x) != float(y) for x, y in zip(jax.tree.leaves(a['drop_logits']), jax.tree.leaves(before))
  ]
  if mode == 'random':  # frozen at p0, no entropy term
    assert not any(moved) and history[0]['entropy'] == 0.0
  else:
    assert all(moved)


def test_in_the_random_ablation_straight_through_and_disarm_train_alike(tiny_net):
  """Both train the weights on the hard mask 1 - d of the same noise; neither moves the
  frozen logits (and DisARM skips its second pass)."""
  params = []
  for name in ('straight_through', 'disarm'):
    config = tiny.steps_config(NUM_STEPS, estimator=name, mode='random')
    steps = tiny.Stepper(tiny_net, config, jax.devices()[:1])
    params.append(jax.tree.leaves(jax.device_get(steps(steps.state, 0, 2)[0].params)))
  for a, b in zip(*params):
    np.testing.assert_array_equal(a, b)


def test_disarm_gradients_on_four_devices_equal_one_device(tiny_net):
  config = tiny.steps_config(NUM_STEPS, estimator='disarm')
  grads = {n: tiny.gradients(tiny_net, config, jax.devices()[:n]) for n in (1, 4)}
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert any(abs(float(g)) > 0 for g in jax.tree.leaves(grads[1]['drop_logits']))


def test_a_resumed_run_keeps_the_temperature_schedule(tiny_net):
  """The schedule reads the state's step: a run stopped after 2 of 4 steps and continued by
  a new train step (as a new process would) is the uninterrupted run, bit for bit."""
  config = tiny.steps_config(NUM_STEPS, estimator='straight_through', tau=0.5, final_tau=0.05)
  steps = tiny.Stepper(tiny_net, config, jax.devices()[:1])
  whole, history = steps(steps.state, 0, 4)
  taus = [float(h['tau']) for h in history]
  np.testing.assert_allclose(taus, [0.5 * 0.1 ** (t / 3) for t in range(4)], rtol=1e-6)
  half, _ = steps(steps.fresh(), 0, 2)
  saved = jax.device_get(half)
  resumed_steps = tiny.Stepper(tiny_net, config, jax.devices()[:1])
  resumed, rest = resumed_steps(parallel.put_replicated(saved, resumed_steps.mesh), 2, 2)
  assert [float(h['tau']) for h in rest] == taus[2:]
  for a, b in zip(
    jax.tree.leaves(jax.device_get(whole.params)), jax.tree.leaves(jax.device_get(resumed.params))
  ):
    np.testing.assert_array_equal(a, b)


def test_a_run_saved_before_the_estimator_fields_resumes(tmp_path):
  """A config.json from before drop.estimator and drop.final_tau ran as their defaults; a
  changed estimator changes the training, so it is refused like another seed."""
  config = config_lib.get_config()
  saved = config.to_dict()
  del saved['drop']['estimator'], saved['drop']['final_tau']
  workdir_lib.write_json(str(tmp_path / 'config.json'), saved)
  resume.check_resumable(str(tmp_path), config)
  config.drop.estimator = 'disarm'
  with pytest.raises(errors.IncompatibleWorkdirError, match="drop.estimator: 'concrete' in the"):
    resume.check_resumable(str(tmp_path), config)
