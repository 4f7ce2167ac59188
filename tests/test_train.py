"""The data-parallel train step: the same gradients and updates on 1 and 4 devices; the
'random' ablation never moves the logits; schedules."""

import types

import jax
import numpy as np
import pytest

import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import errors, export, finetune, layers, masks, optim, parallel, rng
from pgnas_jax import space as space_lib


NUM_STEPS = 3  # the run's length, which the learning-rate schedule spans; tests take 2 steps


def _run_steps(tiny_net, config, devices, steps=2):
  stepper = tiny.Stepper(tiny_net, config, devices)
  state, history = stepper(stepper.state, 0, steps)
  return jax.device_get(state.params), history, stepper.space, state


def test_gradients_on_four_devices_equal_one_device(tiny_net):
  config = tiny.steps_config(NUM_STEPS)
  grads = {
    name: tiny.gradients(tiny_net, config, jax.devices()[:n])
    for name, n in (('one', 1), ('four', 4))
  }
  flat1, flat4 = jax.tree.leaves(grads['one']), jax.tree.leaves(grads['four'])
  for a, b in zip(flat1, flat4):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  # and they are not trivially zero: the logits receive a gradient
  assert all(abs(float(g)) > 0 for g in jax.tree.leaves(grads['one']['drop_logits']))


@pytest.mark.parametrize('impl', [i for i in rng.IMPLEMENTATIONS if i not in rng.ONE_DEVICE_ONLY])
def test_train_step_same_on_one_and_four_devices(tiny_net, impl):
  config = tiny.steps_config(NUM_STEPS)
  config.rng.impl = impl
  p1, h1, _, _ = _run_steps(tiny_net, config, jax.devices()[:1])
  p4, h4, _, _ = _run_steps(tiny_net, config, jax.devices()[:4])
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for m1, m4 in zip(h1, h4):
    np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)


def test_learned_logits_move_and_random_logits_stay(tiny_net):
  learned, hist, _, state = _run_steps(
    tiny_net, tiny.steps_config(NUM_STEPS, mode='learned', init_p=0.2), jax.devices()[:1]
  )
  assert int(state.step) == 2
  p = jax.nn.sigmoid(np.array(jax.tree.leaves(learned['drop_logits'])))
  assert np.all(np.abs(p - 0.2) > 1e-6)
  assert set(hist[0]) >= {
    'loss',
    'nll',
    'prior',
    'entropy',
    'train_accuracy',
    'learning_rate',
    'mean_p',
  }
  random, hist, _, _ = _run_steps(
    tiny_net, tiny.steps_config(NUM_STEPS, mode='random', random_p=0.3), jax.devices()[:1]
  )
  p = jax.nn.sigmoid(np.array(jax.tree.leaves(random['drop_logits'])))
  np.testing.assert_allclose(p, 0.3, rtol=1e-6)
  assert all(h['entropy'] == 0.0 for h in hist)


def test_step_key_comes_from_root_key_and_step(tiny_net):
  a, _, _, _ = _run_steps(tiny_net, tiny.steps_config(NUM_STEPS), jax.devices()[:1])
  b, _, _, _ = _run_steps(tiny_net, tiny.steps_config(NUM_STEPS), jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  c = tiny.steps_config(NUM_STEPS)
  c.seed = 1
  other, _, _, _ = _run_steps(tiny_net, c, jax.devices()[:1])
  assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(other)[0])


@pytest.mark.parametrize('schedule', ['cosine', 'step', 'sgdr'])
def test_schedules(schedule):
  c = config_lib.get_config().train
  c.schedule, c.learning_rate = schedule, 0.1
  c.step_epochs, c.sgdr_t0_epochs, c.sgdr_t_mul, c.sgdr_min_lr = (2, 4), 1.0, 2.0, 1e-3
  fn = optim.learning_rate_schedule(c, total_steps=100, steps_per_epoch=10)
  values = np.array([float(fn(s)) for s in range(100)])
  assert values[0] == pytest.approx(0.1)
  if schedule == 'cosine':
    assert np.all(np.diff(values) <= 1e-9) and values[-1] < 1e-3
  elif schedule == 'step':
    assert values[19] == pytest.approx(0.1) and values[20] == pytest.approx(0.01)
    assert values[40] == pytest.approx(0.001)
  else:  # restarts at 10, 30, 70 steps
    for restart in (10, 30, 70):
      assert values[restart] == pytest.approx(0.1)
      assert values[restart - 1] < 0.01


def _finetuned(tiny_net, devices):
  """The tiny net after 2 training steps, its candidate mask dropping channel 0 of every
  group, fine-tuned 4 steps on ``devices``."""
  config = tiny.steps_config(NUM_STEPS)
  config.finetune.steps, config.finetune.learning_rate = 4, 0.05
  params, _, space, state = _run_steps(tiny_net, config, jax.devices()[:1])
  variables = {'params': params['weights'], 'batch_stats': jax.device_get(state.batch_stats)}
  mask = jax.tree.map(
    lambda m: np.concatenate([[0.0], np.ones(m.shape[0] - 1)]).astype(np.float32), space.template
  )
  mesh = parallel.make_mesh(devices)
  tuner = finetune.Finetuner(tiny_net, config, tiny.synthetic_dataset(), space, mesh)
  tuned = tuner(variables, mask, params['drop_logits'], jax.random.key(5), first_step=2)
  return variables, jax.device_get(tuned), mask, space


def test_finetuning_trains_kept_weights_only_exports_exactly_and_shards(tiny_net):
  before, after, mask, space = _finetuned(tiny_net, jax.devices()[:1])
  for conv in layers.groups_by_conv(space.template):
    k0 = before['params']
    k1 = after['params']
    for name in conv:
      k0, k1 = k0[name], k1[name]
    # channel 0 (dropped) of the kernel's input axis untouched, the kept ones trained
    np.testing.assert_array_equal(k0['kernel'][:, :, 0], k1['kernel'][:, :, 0])
    assert not np.allclose(k0['kernel'][:, :, 1:], k1['kernel'][:, :, 1:])
  images = jax.numpy.asarray(tiny.synthetic_dataset().test.images, jax.numpy.float32) / 255.0
  masked = tiny_net.apply({**after, 'masks': mask}, images, train=False)
  pruned = tiny_net.apply(export.pruned_variables(after, space, mask), images, train=False)
  np.testing.assert_allclose(pruned, masked, rtol=1e-5, atol=1e-5)
  # data-parallel over 4 devices: the same fine-tuning
  _, four, _, _ = _finetuned(tiny_net, jax.devices()[:4])
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_stop_request_ends_fine_tuning_within_one_step(tiny_net, tiny_variables):
  config = tiny.steps_config(NUM_STEPS)
  config.finetune.steps = 50
  space = space_lib.from_variables(tiny_variables)
  variables = {k: tiny_variables[k] for k in ('params', 'batch_stats')}
  tuner = finetune.Finetuner(
    tiny_net, config, tiny.synthetic_dataset(), space, parallel.make_mesh(jax.devices()[:1])
  )
  guard = types.SimpleNamespace(requested=True, signal_name='SIGTERM')  # arrived at once
  with pytest.raises(errors.Preempted, match='stopped by SIGTERM at fine-tuning step 1 of 50'):
    tuner(
      variables,
      space.template,
      masks.init_drop_logits(space.template, 0.1),
      jax.random.key(5),
      2,
      guard,
    )
