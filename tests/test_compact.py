"""The compact network (issues 15 and 31), derived from the traced program
(``compact/derived.py``): every family's compact logits equal the masked super-network's,
with convs of every kind removed, and so do a custom Linen module's, an NNX module's and
the ViT's; its counts are those of the arrays it stores; an op it cannot follow is named.

Tolerance: float32 logits agree within rtol 1e-5, atol 1e-5. The compact network adds fewer
terms (dropped channels are gone, not zero) in another order, and its BatchNorms are folded
into the convs in float64 and rounded once: about 1e-7 relative per layer, 1e-6 over these
networks (measured up to 1.1e-5 on logits of 41). A wrong channel moves the logits by their
own size (the unmasked super-network differs by more than 1e-4, checked below).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import pgnas_jax
from examples import tiny_cnn, tiny_cnn_nnx, tiny_vit
from pgnas_jax import compact, layers
from pgnas_jax import space as space_lib

# More removals per family, each a different case: a whole branch or layer, the first conv
# of a pair (what follows becomes an image-independent map), the second (a constant).
ALSO_REMOVED = {
  'shake_shake': [('stage0_block0', 'branch0', 'conv0')],
  'enas': [('cell0', 'node2_op0', 'sep1')],
  'resnet': [('stage0_block0', 'multi_kernel', f'branch{i}') for i in range(4)],
  'densenet': [('block0_layer0', 'conv3x3')],
}


def _check_equal(model, variables, mask, image_shape, images):
  masked = tiny.apply(model, {**variables, 'masks': mask}, images)
  net = compact.build(model, variables, mask, image_shape)
  out = jax.jit(compact.inference_fn(net))(net.weights, images)
  np.testing.assert_allclose(np.asarray(out), np.asarray(masked), rtol=1e-5, atol=1e-5)
  return net, masked


@pytest.mark.parametrize('family', sorted(tiny.REMOVED_CONV))
def test_compact_logits_equal_masked_supernet_with_convs_removed(family):
  model, _, variables, space, images = tiny.family_case(family)
  mask = tiny.candidate_mask(space)
  for path in [tiny.REMOVED_CONV[family]] + ALSO_REMOVED[family]:
    tiny.remove_conv(mask, path)
  net, masked = _check_equal(model, variables, mask, images.shape[1:], images)
  full = tiny.apply(model, variables, images)
  assert not np.allclose(np.asarray(full), np.asarray(masked), atol=1e-4)
  # what the compact network stores is what it counts, and less than the input slices
  sizes = sum(np.size(a) for a in jax.tree.leaves(net.weights))
  assert compact.num_params(net) == sizes
  assert compact.macs(net) < space_lib.costs(space, mask)[1]
  # every removed conv's weights are gone: a removed first conv of a pair takes the pair
  for path in [tiny.REMOVED_CONV[family]] + ALSO_REMOVED[family]:
    assert not any(n.startswith('/'.join(path) + '/') for n in net.weights), path


@pytest.mark.parametrize('family', sorted(tiny.REMOVED_CONV))
def test_full_mask_is_the_supernet_and_counts_its_macs(family):
  model, init_variables, variables, space, images = tiny.family_case(family)
  net, _ = _check_equal(model, variables, space.template, images.shape[1:], images)
  training_only = sum(
    int(v) for v in jax.tree.leaves(init_variables['fixed_macs'].get('auxiliary_head', {}))
  )
  assert compact.macs(net) == int(space_lib.costs(space, space.template)[1]) - training_only


def test_shake_shake_compact_params_by_hand():
  model, _, variables, space, images = tiny.family_case('shake_shake')
  mask = tiny.candidate_mask(space)
  tiny.remove_conv(mask, tiny.REMOVED_CONV['shake_shake'])  # stage1_block0/branch1: a constant
  net, _ = _check_equal(model, variables, mask, images.shape[1:], images)
  n = lambda path: int(np.sum(mask[path[0]][path[1]][path[2]]['group0']))
  expected = 3 * 3 * 3 * 4 + 4 + 8 * 3 + 3  # stem (folded BN: a bias), classifier
  for block, width, _ in (('stage0_block0', 4, 4), ('stage1_block0', 8, 4)):
    for branch in ('branch0', 'branch1'):
      k0, k1 = n((block, branch, 'conv0')), n((block, branch, 'conv1'))
      if k1 > 0:  # conv0: kept inputs x conv1's kept inputs, + bias; conv1: k1 x width, + bias
        expected += 9 * k0 * k1 + k1 + 9 * k1 * width + width
      # else the branch is its BatchNorm's constant, which the other branch's last conv
      # takes into its bias: nothing more is stored
  expected += 2 * (4 * 4 + 4)  # stage 1's shortcut: two 1x1 paths 4 -> 4 with biases
  assert compact.num_params(net) == expected
  assert net.weights['stage1_block0/branch0/conv1/bias'].shape == (8,)


def test_densenet_channel_kept_by_some_readers_only():
  model, _, variables, space, images = tiny.family_case('densenet')
  mask = jax.tree.map(np.ones_like, tiny.candidate_mask(space))
  # block 1's input channel 3: dropped by its layer 1, kept by layers 0 and 2; channel 5
  # dropped by layers 0 and 1; layer 0's chunk channel 1 dropped by layer 1 only
  mask['block1_layer1']['conv1x1']['group0'][3] = 0
  for layer in (0, 1):
    mask[f'block1_layer{layer}']['conv1x1']['group0'][5] = 0
  mask['block1_layer1']['conv1x1']['group1'][1] = 0
  net, _ = _check_equal(model, variables, mask, images.shape[1:], images)
  width = variables['params']['transition0']['conv']['kernel'].shape[-1]
  growth = model.growth_rate
  rows = [net.weights[f'block1_layer{i}/conv1x1/kernel'].shape[2] for i in range(3)]
  assert rows == [width - 1, width - 2 + growth - 1, width + 2 * growth]
  # the classifier still reads every channel: none was dropped by every reader; the final
  # BatchNorm holds them but the last layer's, which its conv's bias and kernel took in
  assert net.weights['classifier/linear/kernel'].shape[0] == width + 3 * growth
  assert net.weights['final_bn/scale'].shape == (width + 2 * growth,)
  assert net.weights['block1_layer2/conv3x3/bias'].shape == (growth,)


def _custom_case(module, shape=(8, 8, 1)):
  init = jax.jit(lambda k: module.init({'params': k}, jnp.zeros((1,) + shape), train=False))(
    jax.random.key(0)
  )
  variables = tiny.trained_looking({**init, 'batch_stats': init.get('batch_stats', {})})
  images = np.asarray(jax.random.normal(jax.random.key(5), (3,) + shape))
  return variables, space_lib.from_variables(init), images


@pytest.mark.parametrize(
  'module',
  [
    tiny_cnn.SmallVGG(num_classes=3, widths=(4, 8)),
    pgnas_jax.from_nnx(tiny_cnn_nnx.SmallVGG, num_classes=3, widths=(4, 8)),
    tiny_vit.TinyViT(num_classes=3, width=8, depth=2, num_heads=2),
  ],
  ids=['linen_cnn', 'nnx_cnn', 'vit'],
)
def test_custom_modules_compact_logits_equal_the_masked_module(module):
  """Linen, NNX and the ViT: the unmasked network stores exactly its parameters (BatchNorms
  folded where there are any, a LayerNorm's scale kept), a candidate fewer, the dropped
  hidden units' weights gone."""
  variables, space, images = _custom_case(module)
  total = space_lib.count_params(variables['params'])
  full, _ = _check_equal(module, variables, space.template, (8, 8, 1), images)
  if not variables['batch_stats']:
    assert compact.num_params(full) == total
  assert compact.num_params(full) <= total
  mask = tiny.candidate_mask(space)
  net, _ = _check_equal(module, variables, mask, (8, 8, 1), images)
  assert compact.num_params(net) < compact.num_params(full)
  assert compact.macs(net) < compact.macs(full)


def test_a_dropped_attention_head_is_removed_with_its_projections():
  """The head axis is followed through the query, key and value projections, attention's
  batched products and softmax, to the output projection: a dropped head's slices of all
  four kernels are gone (4 x width x head_dim numbers), and its MACs."""
  module = tiny_vit.TinyViT(num_classes=3, width=8, depth=1, num_heads=2)
  variables, space, images = _custom_case(module)
  mask = jax.tree.map(np.array, space.template)
  full, _ = _check_equal(module, variables, mask, (8, 8, 1), images)
  mask['block0_attention']['group0'][1] = 0
  net, _ = _check_equal(module, variables, mask, (8, 8, 1), images)
  assert compact.num_params(full) - compact.num_params(net) == 4 * 8 * 4
  kernels = [
    a for name, a in net.weights.items() if name.startswith('block0_attention') and 'kernel' in name
  ]
  assert len(kernels) == 4 and all(1 in a.shape and 2 not in a.shape for a in kernels)
  assert compact.macs(net) < compact.macs(full)


class Cumulative(nn.Module):
  """A cumulative sum over the image: an op the derivation does not follow."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.cumsum(layers.SearchableConv(4, 3, name='conv')(x), axis=1)
    return layers.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


def test_an_op_the_derivation_cannot_follow_is_named():
  variables, space, _ = _custom_case(Cumulative())
  with pytest.raises(compact.Unsupported, match="cannot follow the op 'cumsum'"):
    compact.build(Cumulative(), variables, space.template, (8, 8, 1))


def test_a_run_whose_compact_network_cannot_be_derived_keeps_its_input_sliced_winner(
  tmp_path, caplog
):
  """The main job's export step: one logged line naming the op, no compact files, no
  compact fields in arch.json; the input-sliced winner is written before it."""
  import logging

  from pgnas_jax import outputs

  module = Cumulative()
  variables, space, _ = _custom_case(module)
  (tmp_path / 'search').mkdir()
  with caplog.at_level(logging.WARNING):
    fields = outputs.Outputs(str(tmp_path), writes=True).compact(
      module, variables, space.template, (8, 8, 1), measure=True
    )
  assert fields == {} and not list((tmp_path / 'search').iterdir())
  (line,) = [r.getMessage() for r in caplog.records if 'no compact network' in r.getMessage()]
  assert "'cumsum'" in line and 'winner_weights.msgpack' in line


CHILD = """
import sys
import jax, numpy as np
f = jax.export.deserialize(open(sys.argv[1] + '.stablehlo', 'rb').read())
images = np.load(sys.argv[2])
out = np.concatenate([f.call(dict(np.load(sys.argv[1] + '.npz')), images[:n])
                      for n in (1, len(images))])  # two batch sizes, one file
assert 'pgnas_jax' not in sys.modules, 'the child imported pgnas_jax'
np.save(sys.argv[3], out)
"""


@pytest.mark.parametrize('family', sorted(tiny.REMOVED_CONV))
def test_exported_files_run_without_pgnas_jax(family, tmp_path):
  import subprocess
  import sys

  from pgnas_jax.compact import files

  model, _, variables, space, images = tiny.family_case(family)
  mask = tiny.candidate_mask(space)
  tiny.remove_conv(mask, tiny.REMOVED_CONV[family])
  masked = np.asarray(tiny.apply(model, {**variables, 'masks': mask}, images))
  net = compact.build(model, variables, mask, images.shape[1:])
  written = files.save(net, str(tmp_path), 'winner_compact')
  assert sorted(written.values()) == ['winner_compact.npz', 'winner_compact.stablehlo']
  with np.load(tmp_path / 'winner_compact.npz') as stored:
    assert sum(a.size for a in stored.values()) == compact.num_params(net)
  np.save(tmp_path / 'images.npy', images)
  # a fresh interpreter started away from the repository, so pgnas_jax cannot be imported
  # by accident from the working directory
  subprocess.run(
    [
      sys.executable,
      '-c',
      CHILD,
      str(tmp_path / 'winner_compact'),
      str(tmp_path / 'images.npy'),
      str(tmp_path / 'out.npy'),
    ],
    check=True,
    cwd=tmp_path,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin'},
  )
  out = np.load(tmp_path / 'out.npy')
  np.testing.assert_allclose(out[1:], masked, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:1], masked[:1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A tiny main job run to the end, its latency timed."""
  from pgnas_jax import pipeline

  workdir = tmp_path_factory.mktemp('run')
  return str(workdir), pipeline.run(tiny.config({'export.latency': True}), str(workdir)).arch


@pytest.mark.xdist_group('compact_run')  # shares a module fixture
@pytest.mark.long(23)
def test_main_job_writes_the_compact_winner(finished_run):
  import json
  import os

  workdir, arch = finished_run
  with open(os.path.join(workdir, 'search', 'arch.json')) as f:
    assert arch == json.load(f)
  assert (arch['input_slice_params'], arch['input_slice_flops']) == (arch['params'], arch['flops'])
  assert arch['compact_flops'] <= arch['flops']
  for name in arch['compact_files'].values():
    assert os.path.exists(os.path.join(workdir, 'search', name))
  assert os.path.exists(os.path.join(workdir, 'search', 'winner_weights.msgpack'))  # kept
  for network in ('compact', 'masked_supernet', 'supernet'):
    assert set(arch['latency_ms'][network]) == {'1', '128'}
    assert all(v > 0 for v in arch['latency_ms'][network].values())
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  assert '## The compact winner' in report and 'masked supernet' in report


@pytest.mark.xdist_group('compact_run')  # shares a module fixture
def test_export_cli_redraws_a_candidate_from_its_index(finished_run, capsys):
  import json
  import os

  from pgnas_jax import export

  workdir, arch = finished_run
  # the winner again, as a candidate: the same mask, so the same arrays
  export.main(['--workdir', workdir, '--candidate', str(arch['index']), '--no-latency'])
  printed = json.loads(capsys.readouterr().out)
  assert printed['compact_params'] == arch['compact_params']
  folder = os.path.join(workdir, 'search')
  with (
    np.load(os.path.join(folder, f'candidate{arch["index"]}_compact.npz')) as again,
    np.load(os.path.join(folder, 'winner_compact.npz')) as winner,
  ):
    assert sorted(again) == sorted(winner)
    for k in winner:
      np.testing.assert_array_equal(again[k], winner[k])
  for argv, message in (
    (['--workdir', workdir, '--candidate', '5'], '--candidate=5 is not in'),
    (['--workdir', os.path.join(workdir, 'search')], 'holds no finished run'),
    (['--workdir', os.path.join(workdir, 'absent')], 'does not exist'),
    (['--workdir', workdir, '--cpu_devices', 'zero'], "--cpu_devices='zero' is not valid"),
  ):
    with pytest.raises(SystemExit) as stopped:
      export.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('pgnas_jax: ') and message in err and err.count('\n') == 1


@pytest.mark.xdist_group('compact_run')  # shares a module fixture
def test_export_reads_a_run_made_before_the_newest_fields(finished_run, tmp_path, capsys):
  """A config.json from before the fields of targets, channel blocks and init_from existed:
  the export command fills them with the values such a run had (``Field.older_runs``)."""
  import json
  import shutil

  from pgnas_jax import export

  workdir, arch = finished_run
  old = tmp_path / 'old'
  shutil.copytree(workdir, old)
  saved = json.loads((old / 'config.json').read_text())
  for section, name in (
    ('objective', 'target_params'),
    ('objective', 'target_flops'),
    ('objective', 'target_ramp'),
    ('train', 'init_from'),
    ('search', 'channel_multiple'),
  ):
    del saved[section][name]
  (old / 'config.json').write_text(json.dumps(saved))
  export.main(['--workdir', str(old), '--candidate', str(arch['index']), '--no-latency'])
  assert json.loads(capsys.readouterr().out)['compact_params'] == arch['compact_params']


@pytest.mark.xdist_group('compact_run')  # shares a module fixture
def test_export_cli_splits_the_cpu_as_the_run_did(finished_run, tmp_path):
  """In a fresh process, as users run it: latencies are measured on the devices the main
  job would make of this CPU for the run's config, so the two compare."""
  import json
  import os
  import shutil
  import subprocess
  import sys

  from pgnas_jax.backends.cpu import host_devices
  from pgnas_jax.compact import candidate

  workdir = str(tmp_path / 'run')
  shutil.copytree(finished_run[0], workdir)  # the shared run keeps its files
  index = finished_run[1]['index']
  subprocess.run(
    [sys.executable, '-m', 'pgnas_jax.export', f'--workdir={workdir}', f'--candidate={index}'],
    env=tiny.ONE_DEVICE,
    check=True,
    capture_output=True,
  )
  with open(os.path.join(workdir, 'search', f'candidate{index}_compact.json')) as f:
    device = json.load(f)['latency_ms']['device']
  config = candidate.finished_config(workdir)
  count = host_devices.choose(host_devices.AUTO, config, host_devices.usable_cores())
  if count > 1:
    assert f'one single-threaded device of {count}' in device, device
  else:
    assert 'device of' not in device, device


@pytest.mark.xdist_group('compact_run')  # shares a module fixture
def test_export_cli_reads_a_damaged_or_busy_workdir_as_the_main_job(finished_run, tmp_path, capsys):
  """The export command reads the workdir through the main job's readers, under its lock:
  a cut candidates line is cut back; a missing or damaged file, a file given as the
  workdir, or a workdir in use is one line."""
  import os
  import shutil

  from pgnas_jax import export, lock

  workdir, arch = finished_run

  def copy(name):
    target = str(tmp_path / name)
    shutil.copytree(workdir, target)
    return target

  cut = copy('cut')
  path = os.path.join(cut, 'search', 'candidates.jsonl')
  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]])
  export.main(['--workdir', cut, '--candidate', '0', '--no-latency'])
  assert os.path.exists(os.path.join(cut, 'search', 'candidate0_compact.npz'))
  capsys.readouterr()
  empty_config, no_arch, no_candidates, busy = (copy(n) for n in ('c', 'a', 'n', 'b'))
  open(os.path.join(empty_config, 'config.json'), 'w').close()
  os.remove(os.path.join(no_arch, 'search', 'arch.json'))
  open(os.path.join(no_candidates, 'search', 'candidates.jsonl'), 'w').close()
  a_file = str(tmp_path / 'a_file')
  open(a_file, 'w').close()
  held = lock.WorkdirLock(busy)
  held.acquire()
  try:
    for argv, message in (
      (['--workdir', empty_config], 'config.json (the config the run was made with) is empty'),
      (['--workdir', no_arch], "arch.json (the winner's description) is missing: rerun"),
      (['--workdir', no_candidates, '--candidate', '0'], 'it holds no candidate'),
      (['--workdir', a_file], 'is a file, not a folder'),
      (['--workdir', busy], 'is in use by another run'),
    ):
      with pytest.raises(SystemExit) as stopped:
        export.main(argv)
      assert stopped.value.code == 2
      err = capsys.readouterr().err
      assert err.startswith('pgnas_jax: ') and message in err and err.count('\n') == 1, err
  finally:
    held.release()
