"""The paper's super-networks (SPEC section 5): parameter counts at full size (from shapes
only, ``jax.eval_shape``), forward and backward through the training loss, the search
structure, and export equality on tiny sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import errors, export, layers, masks, supernets, train
from pgnas_jax import objective as objective_lib
from pgnas_jax import space as space_lib

# ResNet-50 (He et al. 2016; torchvision's resnet50 holds exactly this many): 25,557,032
# parameters, of which 11,317,248 in its sixteen 3x3 convs (9 w^2 each, w = 64, 128, 256,
# 512 over 3, 4, 6, 3 blocks). SupNet-R-50 replaces each by four quarter-width branches,
# 1 + 9 + 9 + 25 = 44 weights per input-output channel pair instead of 4 x 9 = 36.
RESNET50_PARAMS = 25_557_032
RESNET50_3X3_PARAMS = 9 * sum(b * w * w for b, w in zip((3, 4, 6, 3), (64, 128, 256, 512)))
SUPNET_R50_PARAMS = RESNET50_PARAMS + RESNET50_3X3_PARAMS * (44 - 36) // 36  # 28,071,976


def _shapes(model, image_shape):
  """The variables' shapes, without computing (or allocating) any of them."""
  return jax.eval_shape(
    lambda k: model.init({'params': k}, jnp.zeros((1,) + image_shape), train=False),
    jax.random.key(0),
  )


def _params(model, image_shape):
  return space_lib.count_params(_shapes(model, image_shape)['params'])


def _supnet_m(name, widths, paper):
  """SupNet-M and -MI: shake-shake of four blocks a stage on CIFAR-10, within 1% of the paper."""
  return (
    name,
    'shake_shake',
    dict(stem_width=16, widths=widths, blocks_per_stage=4),
    10,
    (32, 32, 3),
    paper,
    0.01,
  )


@pytest.mark.parametrize(
  'name, family, fields, num_classes, image_shape, paper, tolerance',
  [
    _supnet_m('SupNet-M', (96, 192, 384), 26.2e6),
    _supnet_m('SupNet-MI', (160, 320, 640), 72.7e6),
    ('SupNet-E', 'enas', dict(), 10, (32, 32, 3), 4.6e6, 0.05),
    ('SupNet-EI', 'enas', dict(filters=72), 10, (32, 32, 3), 15.3e6, 0.05),
    ('SupNet-D-121', 'densenet', dict(), 1000, (224, 224, 3), 7.98e6, 0.01),
  ],
)
def test_parameter_count_matches_paper(
  name, family, fields, num_classes, image_shape, paper, tolerance
):
  params = _params(tiny.supernet(family, num_classes, **fields), image_shape)
  assert abs(params - paper) <= tolerance * paper, f'{name}: {params} vs {paper:.0f}'


def test_supnet_r50_is_resnet50_with_multi_kernel_blocks():
  # with one plain 3x3 branch, the family is ResNet-50 itself
  plain = tiny.supernet('resnet', 1000, kernel_sizes=(3,), dilations=(1,))
  assert _params(plain, (224, 224, 3)) == RESNET50_PARAMS
  assert _params(tiny.supernet('resnet', 1000), (224, 224, 3)) == SUPNET_R50_PARAMS


def test_supnet_r50_groups_are_kernel_branches():
  v = _shapes(tiny.supernet('resnet', 1000), (224, 224, 3))
  template = v['masks']
  assert len(jax.tree.leaves(template)) == 16 * 4
  branches = v['params']['stage3_block0']['multi_kernel']
  shapes = [branches[f'branch{i}']['kernel'].shape for i in range(4)]
  assert shapes == [(1, 1, 512, 128), (3, 3, 512, 128), (3, 3, 512, 128), (5, 5, 512, 128)]
  assert all(
    template['stage3_block0']['multi_kernel'][f'branch{i}']['group0'].shape == (512,)
    for i in range(4)
  )


def test_supnet_d121_groups_follow_sources():
  template = _shapes(tiny.supernet('densenet', 1000), (224, 224, 3))['masks']
  block_inputs = (64, 128, 256, 512)
  for b, num_layers in enumerate((6, 12, 24, 16)):
    for i in range(num_layers):
      layer = template[f'block{b}_layer{i}']
      sizes = [
        layer['conv1x1'][layers.group_name(g)].shape[0] for g in range(len(layer['conv1x1']))
      ]
      assert sizes == [block_inputs[b]] + [32] * i, (b, i)
      assert len(layer['conv3x3']) == 1 and layer['conv3x3']['group0'].shape == (128,)
  assert len(jax.tree.leaves(template)) == sum(n * (n + 1) // 2 + n for n in (6, 12, 24, 16))


def test_supnet_e_separable_convs_are_the_groups():
  v = _shapes(tiny.supernet('enas'), (32, 32, 3))
  # per cell, 6 separable ops of 2 convs each (both arcs), 17 cells
  assert len(jax.tree.leaves(v['masks'])) == 17 * 12
  op = v['params']['cell0']['node2_op1']  # normal arc, node 2: op 0 (sep3x3) from input 0
  assert op['sep0']['depthwise'].shape == (3, 3, 36, 1)
  assert op['sep0']['pointwise'].shape == (1, 1, 36, 36)
  assert v['masks']['cell0']['node2_op1']['sep0']['group0'].shape == (36,)
  assert v['params']['cell16']['node3_op1']['sep1']['depthwise'].shape == (5, 5, 144, 1)


def _reference_separable(x, depthwise, pointwise, keep):
  """Depthwise kxk (SAME, stride 1) then pointwise 1x1, written out in NumPy."""
  x = np.asarray(x, np.float64) * keep
  k = depthwise.shape[0]
  pad = k // 2
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  dw = np.zeros_like(x)
  for i in range(k):
    for j in range(k):
      dw += padded[:, i : i + h, j : j + w, :] * np.asarray(depthwise, np.float64)[i, j, :, 0]
  return dw @ np.asarray(pointwise, np.float64)[0, 0]


class _Separable(nn.Module):
  @nn.compact
  def __call__(self, x):
    return layers.SearchableConv(4, 3, separable=True, name='sep')(x)


def test_separable_conv_drops_depthwise_filter_and_pointwise_slice():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  v = _Separable().init(jax.random.key(1), x)
  dw, pw = v['params']['sep']['depthwise'], v['params']['sep']['pointwise']
  keep = np.array([1.0, 0.0, 1.0])
  out = _Separable().apply({**v, 'masks': {'sep': {'group0': jnp.asarray(keep)}}}, x)
  np.testing.assert_allclose(out, _reference_separable(x, dw, pw, keep), rtol=1e-5, atol=1e-5)
  # the pruned op holds depthwise filters 0, 2 and the pointwise rows that read them
  pruned = export.pruned_variables(
    {**v, 'batch_stats': {}},
    space_lib.SearchSpace(v['masks'], v['channel_costs'], 0, 0),
    {'sep': {'group0': jnp.asarray(keep)}},
  )
  np.testing.assert_array_equal(pruned['params']['sep']['depthwise'], dw[:, :, [0, 2]])
  np.testing.assert_array_equal(pruned['params']['sep']['pointwise'], pw[:, :, [0, 2]])
  np.testing.assert_allclose(_Separable().apply(pruned, x), out, rtol=1e-5, atol=1e-5)
  # a kept input channel costs its depthwise filter and its pointwise row
  np.testing.assert_array_equal(v['channel_costs']['sep']['group0'], [9 + 4, 25 * (9 + 4)])
  norms = layers.group_sq_norms(v['params'], v['masks'])
  np.testing.assert_allclose(norms['sep']['group0'], np.sum(dw**2) + np.sum(pw**2), rtol=1e-6)


@pytest.mark.parametrize('family', sorted(tiny.FAMILIES))
def test_forward_and_backward_through_training_loss(family):
  model, variables, image_shape = tiny.family_net(family)
  space = space_lib.from_variables(variables)
  config = config_lib.get_config()
  params = {
    'weights': variables['params'],
    'drop_logits': masks.init_drop_logits(space.template, 0.3),
  }
  batch = {
    'images': jax.random.normal(jax.random.key(2), (4,) + image_shape),
    'labels': jnp.array([0, 1, 2, 1]),
  }
  loss_fn = train.make_loss_fn(model, space, config)

  def loss_parts(p):
    loss, (parts, _, _) = loss_fn(p, variables['batch_stats'], batch, jax.random.key(3))
    return loss, parts.nll

  grads, nll_grads = jax.jit(jax.jacrev(loss_parts))(params)
  for tree in (grads['weights'], grads['drop_logits']):
    leaves = jax.tree.leaves(tree)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  # the data term reaches every searchable group's drop logit
  assert all(float(g) != 0 for g in jax.tree.leaves(nll_grads['drop_logits']))
  if family == 'enas':  # the auxiliary classifier trains, through the loss alone
    aux = jax.tree.leaves(grads['weights']['auxiliary_head'])
    assert all(float(jnp.sum(jnp.abs(g))) > 0 for g in aux)
    assert not any(
      float(jnp.sum(jnp.abs(g))) > 0
      for g in jax.tree.leaves(nll_grads['weights']['auxiliary_head'])
    )
  logits = tiny.apply(model, variables, batch['images'])
  assert logits.shape == (4, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_auxiliary_loss_is_weighted_cross_entropy():
  rng = np.random.default_rng(0)
  logits, aux = rng.normal(size=(2, 5, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0])
  objective = config_lib.get_config().objective
  objective.auxiliary_weight = 0.7
  args = ({'weights': {}, 'drop_logits': {}}, {}, objective, True)
  loss = objective_lib.negative_elbo(jnp.asarray(logits), labels, *args)
  without = loss[0]
  total, parts = objective_lib.with_auxiliary(loss, [jnp.asarray(aux)], labels, 0.7)
  assert objective_lib.with_auxiliary(loss, [], labels, 0.7) is loss
  log_p = aux - np.log(np.sum(np.exp(aux), axis=1, keepdims=True))
  expected = -0.7 * np.mean(log_p[np.arange(5), labels])
  np.testing.assert_allclose(float(parts.auxiliary), expected, rtol=1e-5)
  np.testing.assert_allclose(float(total - without), expected, rtol=1e-5)


@pytest.mark.parametrize('family', sorted(tiny.FAMILIES))
def test_exported_candidate_gives_masked_supernet_logits(family):
  model, init_variables, variables, space, images = tiny.family_case(family)
  mask = tiny.candidate_mask(space)
  removed = tiny.REMOVED_CONV[family]
  tiny.remove_conv(mask, removed)
  masked = tiny.apply(model, {**variables, 'masks': mask}, images)
  pruned = export.pruned_variables(variables, space, mask)
  out = tiny.apply(model, pruned, images)
  np.testing.assert_allclose(np.asarray(out), np.asarray(masked), rtol=1e-4, atol=1e-4)
  # the removed conv holds no input channels; the others hold exactly their kept ones
  conv_params = pruned['params']
  for name in removed:
    conv_params = conv_params[name]
  assert all(k.shape[2] == 0 for k in conv_params.values())
  desc = export.describe(space, mask, pruned)  # checks pruned weights against the cost model
  assert '/'.join(removed) in desc['removed_convs']
  assert desc['params'] == space_lib.count_params(pruned['params'])
  assert desc['params'] < space_lib.count_params(init_variables['params'])
  # dropping is not a no-op: the unmasked super-network differs
  full = tiny.apply(model, variables, images)
  assert not np.allclose(np.asarray(full), np.asarray(masked), atol=1e-4)


@pytest.mark.parametrize(
  'override, field',
  [
    (('enas', 'normal_arc', (0, 2, 0, 0, 2, 5, 0, 1)), 'model.enas.normal_arc'),
    (('enas', 'reduction_arc', (0, 2, 3, 0)), 'model.enas.reduction_arc'),
    (('resnet', 'dilations', (1, 2)), 'model.resnet.dilations'),
    (('resnet', 'widths', (64, 130, 256, 512)), 'model.resnet.widths'),
    (('densenet', 'compression', 0.0), 'model.densenet.compression'),
  ],
)
def test_bad_family_fields_are_refused(override, field):
  c = config_lib.get_config()
  family, name, value = override
  c.model[family][name] = value
  with pytest.raises(errors.ConfigError, match=field.replace('.', r'\.')):
    config_lib.validate(c)


def test_every_family_is_a_config_choice():
  family = next(f for f in config_lib.fields() if f.name == 'model.family')
  assert (*supernets.FAMILIES, 'custom') == family.choices
  assert config_lib.get_config().model.family == 'shake_shake'


def test_shake_mix_weights_forward_and_backward_independently():
  """Shake-shake (SPEC section 5): in training the output is a per-image convex mix of the
  branches with weights ``f``, the gradient reaches branch i with other weights ``b``
  (drawn apart from ``f``); at evaluation it is the branches' mean."""
  from pgnas_jax.supernets.shake_shake import ShakeMix

  batch = 64
  ones, zeros = jnp.ones((batch, 3, 3, 2)), jnp.zeros((batch, 3, 3, 2))
  mix = ShakeMix()
  rngs = {'shake': jax.random.key(5)}
  f = mix.apply({}, [ones, zeros], True, rngs=rngs)[:, 0, 0, 0]  # branch 0's forward weight
  assert np.all((f >= 0) & (f <= 1)) and np.std(f) > 0.1  # U(0, 1) per image: std 0.29
  y0, y1 = 3.0 * ones, -2.0 * ones
  out = mix.apply({}, [y0, y1], True, rngs=rngs)
  np.testing.assert_allclose(out[:, 0, 0, 0], 3.0 * f - 2.0 * (1 - f), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda a, b: jnp.sum(mix.apply({}, [a, b], True, rngs=rngs)), (0, 1))(y0, y1)
  b = grads[0][:, 0, 0, 0]
  np.testing.assert_allclose(grads[0] + grads[1], 1.0, rtol=1e-6)  # convex backward weights
  assert np.all((b >= 0) & (b <= 1)) and np.max(np.abs(b - f)) > 0.1  # drawn apart from f
  np.testing.assert_allclose(mix.apply({}, [y0, y1], False), 0.5 * (y0 + y1))
