"""The negative ELBO against an independent NumPy computation, and gradient signs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgnas_jax import layers, masks, objective


class TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = layers.SearchableConv(6, 3, groups=(3, 5), name='split')(x)
    x = layers.SearchableConv(4, 1, name='single')(nn.relu(x))
    x = layers.Conv(4, 3, name='plain')(x)
    return layers.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


def _objective(prior='posterior', weight_decay=0.0):
  c = ml_collections.ConfigDict()
  c.prior, c.weight_prior_l2, c.constant_l2 = prior, 37.0, 11.0
  c.num_train_effective, c.weight_decay = 900.0, weight_decay
  return c


def _setup(seed=0):
  variables = TwoConvs().init(jax.random.key(seed), jnp.zeros((1, 5, 5, 8)))
  params = jax.tree.map(lambda w: w + 0.3, variables['params'])  # nothing special about init
  template = variables['masks']
  rng = np.random.default_rng(seed)
  logits = jax.tree.map(lambda _: jnp.float32(rng.normal()), template)
  return params, template, logits


def _numpy_reference(params, logits, out, labels, cfg, learned=True):
  theta = {
    ('split', 'group0'): logits['split']['group0'],
    ('split', 'group1'): logits['split']['group1'],
    ('single', 'group0'): logits['single']['group0'],
  }
  k_split = np.asarray(params['split']['kernel'], np.float64)
  k_single = np.asarray(params['single']['kernel'], np.float64)
  slices = {
    ('split', 'group0'): k_split[:, :, :3, :],
    ('split', 'group1'): k_split[:, :, 3:, :],
    ('single', 'group0'): k_single,
  }
  prior = entropy = 0.0
  for g, w in slices.items():
    p = 1.0 / (1.0 + np.exp(-float(theta[g])))
    c = cfg.weight_prior_l2 * (1 - p) if cfg.prior == 'posterior' else cfg.constant_l2
    prior += c * np.sum(w**2)
    if learned:
      entropy += w.shape[2] * (p * np.log(p) + (1 - p) * np.log(1 - p))
  z = np.asarray(out, np.float64)
  logp = z - z.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  nll = -np.mean(logp[np.arange(len(labels)), labels])
  decay = (
    0.5
    * cfg.weight_decay
    * sum(np.sum(np.asarray(params[n]['kernel'], np.float64) ** 2) for n in ('plain',))
  )
  decay += (
    0.5 * cfg.weight_decay * np.sum(np.asarray(params['head']['linear']['kernel'], np.float64) ** 2)
  )
  n = cfg.num_train_effective
  return nll + prior / n + entropy / n + decay, nll, prior / n, entropy / n


def test_objective_equals_numpy_computation():
  params, template, logits = _setup()
  out = jax.random.normal(jax.random.key(1), (7, 3)) * 3
  labels = jnp.array([0, 1, 2, 2, 1, 0, 1])
  for cfg, learned in (
    (_objective(), True),
    (_objective('constant'), True),
    (_objective(weight_decay=0.01), True),
    (_objective(), False),
  ):
    params_and_logits = {'weights': params, 'drop_logits': logits}
    total, parts = objective.negative_elbo(out, labels, params_and_logits, template, cfg, learned)
    ref_total, ref_nll, ref_prior, ref_entropy = _numpy_reference(
      params, logits, out, labels, cfg, learned
    )
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    np.testing.assert_allclose(float(parts.nll), ref_nll, rtol=1e-5)
    np.testing.assert_allclose(float(parts.prior), ref_prior, rtol=1e-5)
    np.testing.assert_allclose(float(parts.entropy), ref_entropy, rtol=1e-5, atol=1e-9)


def _masked_loss(params, logits, template, images, labels, cfg, key):
  m = masks.relaxed_masks(key, logits, template, images.shape[0], 0.2)
  out = TwoConvs().apply({'params': params, 'masks': m}, images)
  return objective.negative_elbo(
    out, labels, {'weights': params, 'drop_logits': logits}, template, cfg, True
  )[0]


def test_logit_gradient_of_zeroed_group_is_entropy_pull_toward_half():
  params, template, _ = _setup()
  # group 'single' has all weights zero: its masks cannot change the output, and its prior
  # term is zero, so only the entropy term moves its logit: towards p = 0.5.
  params = {**params, 'single': {'kernel': jnp.zeros_like(params['single']['kernel'])}}
  images = jax.random.normal(jax.random.key(2), (6, 5, 5, 8))
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  cfg = _objective()
  for p in (0.1, 0.8):
    logits = masks.init_drop_logits(template, p)
    grad = jax.grad(_masked_loss, argnums=1)(
      params, logits, template, images, labels, cfg, jax.random.key(3)
    )
    g = float(grad['single']['group0'])
    theta = float(masks.logit(jnp.float32(p)))
    # d/dtheta of |g| (p log p + (1-p) log(1-p)) / N = |g| theta p (1-p) / N, |g| = 6 inputs
    np.testing.assert_allclose(g, 6 * theta * p * (1 - p) / cfg.num_train_effective, rtol=1e-4)
    assert np.sign(g) == np.sign(theta)  # descent moves theta towards 0, p towards 0.5


def test_weight_prior_pushes_drop_probability_up():
  # With the entropy and the data term out of the picture (zero output weights), the
  # prior l2 (1 - p) ||w||^2 / N has derivative -l2 p (1 - p) ||w||^2 / N in theta.
  params, template, logits = _setup()
  cfg = _objective()

  def prior_only(lg):
    return objective.regulariser(params, lg, template, cfg, learned=False)[0]

  grad = jax.grad(prior_only)(logits)
  w = np.asarray(params['single']['kernel'])
  p = float(jax.nn.sigmoid(logits['single']['group0']))
  expected = -cfg.weight_prior_l2 * p * (1 - p) * np.sum(w**2) / cfg.num_train_effective
  np.testing.assert_allclose(float(grad['single']['group0']), expected, rtol=1e-5)
  assert float(grad['single']['group0']) < 0
