"""The main job end to end on a tiny config, and its answers to bad input."""

import json
import os

import pytest

import tiny
from pgnas_jax import errors
from pgnas_jax import config as config_lib


def test_main_job_writes_the_workdir_contract(tmp_path):
  result = tiny.main(tmp_path, *tiny.flags({'finetune.steps': 3}))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train step 6/6' in result.stderr and 'search 5/5 candidates' in result.stderr

  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model']['shake_shake']['widths'] == [4, 8] and config['train']['num_steps'] == 6

  metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in metrics] == [3, 6]
  for key in ('loss', 'nll', 'prior', 'entropy', 'train_accuracy', 'learning_rate', 'mean_p'):
    assert all(key in m for m in metrics)

  posterior = json.loads((tmp_path / 'posterior.json').read_text())
  assert len(posterior) == 8  # 2 stages x 1 block x 2 branches x 2 convs
  assert all(set(r) == {'name', 'channels', 'p'} and 0 < r['p'] < 1 for r in posterior)

  candidates = [
    json.loads(line) for line in (tmp_path / 'search' / 'candidates.jsonl').read_text().splitlines()
  ]
  assert [c['index'] for c in candidates] == list(range(5))
  for c in candidates:
    assert {'index', 'val_acc', 'val_loss', 'params', 'flops', 'dropped'} <= set(c)
    assert set(c['dropped']) == {r['name'] for r in posterior}

  arch = json.loads((tmp_path / 'search' / 'arch.json').read_text())
  best = max(c['val_acc'] for c in candidates)
  assert arch['val_acc'] == best
  winner = candidates[arch['index']]
  assert arch['params'] == winner['params'] and arch['flops'] == winner['flops']
  for r in posterior:
    assert len(arch['kept_channels'][r['name']]) == r['channels'] - winner['dropped'][r['name']]
  for key in ('removed_convs', 'test_acc'):
    assert key in arch
  assert set(arch['supernet']) == {'val_acc', 'test_acc', 'params', 'flops'}
  assert (tmp_path / 'search' / 'winner_weights.msgpack').stat().st_size > 0
  assert arch['finetuned']['steps'] == 3
  assert 0.0 <= arch['finetuned']['val_acc'] <= 1.0 and 0.0 <= arch['finetuned']['test_acc'] <= 1.0
  assert (tmp_path / 'search' / 'winner_finetuned_weights.msgpack').stat().st_size > 0
  assert 'winner fine-tuned 3 steps' in result.stderr
  assert set(json.loads((tmp_path / 'timings.json').read_text())) == {
    'train',
    'search',
    'test and export',
    'fine-tune',
  }
  report = (tmp_path / 'report.md').read_text()
  assert 'winner' in report and 'fine-tuned 3 steps' in report
  for plot in ('drop_probabilities.png', 'candidate_val_accuracy.png'):
    assert (tmp_path / 'plots' / plot).read_bytes()[:4] == b'\x89PNG'

  # docs/observability.md: the overview at start, TensorBoard's tags (their steps and values
  # are checked in tests/test_observe.py)
  assert 'super-network parameters:' in result.stderr
  for run, tags in (
    ('train', (b'loss', b'mean_p/stage0', b'mean_p/stage1')),
    ('search', (b'best_val_acc',)),
  ):
    events = b''.join(p.read_bytes() for p in (tmp_path / 'tensorboard' / run).iterdir())
    assert all(tag in events for tag in tags), run


def test_a_workdir_holding_a_run_is_left_alone(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0}')
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n')
  result = tiny.main(tmp_path)
  assert result.returncode != 0 and 'holds a run made with another config' in result.stderr
  assert (tmp_path / 'config.json').read_text() == '{"seed": 0}'
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'metrics.jsonl']


def _users_workdir(tmp_path):
  """A workdir holding something of the user's: a refused job must leave it untouched."""
  (tmp_path / 'notes.txt').write_text('mine')
  return tmp_path


def _untouched(workdir):
  assert [p.name for p in workdir.iterdir()] == ['notes.txt']
  assert (workdir / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('drop.tau', 0.0, 'drop.tau=0.0 is out of range: it must be > 0'),
    ('drop.init_p', 1.5, 'drop.init_p=1.5 is out of range: it must be in (0, 1)'),
    ('drop.init_p', 0.0, 'drop.init_p=0.0 is out of range'),
    ('objective.num_train_effective', 0.0, 'num_train_effective=0.0 is out of range'),
    ('objective.weight_prior_l2', -1.0, 'weight_prior_l2=-1.0 is out of range'),
    (
      'search.chunk_size',
      0,
      "search.chunk_size=0 is out of range: it must be 'auto' or a whole number >= 1",
    ),
    ('search.chunk_size', 'many', "search.chunk_size='many' is out of range"),
    ('data.validation_size', 60000, 'validation_size=60000 leaves no training images'),
    ('drop.mode', 'sometimes', "drop.mode='sometimes' is not one of"),
    ('train.batch_size', 130, 'batch_size=130 does not split over 4 devices'),
    ('data.data_dir', '/nonexistent', 'apt-get install dataset-fashion-mnist'),
  ],
)
def test_bad_config_values_are_refused_with_a_clear_message(
  tmp_path, capsys, field, value, message
):
  """In-process, as the command line runs the job once the flags are parsed."""
  config = config_lib.get_config()
  section, name = field.split('.')
  config[section][name] = value
  assert message in tiny.refused(config, tmp_path, capsys)


@pytest.mark.parametrize(
  'args, message',
  [
    (['--config.drop.tau=0'], 'drop.tau=0.0 is out of range: it must be > 0'),
    (['--config.train.shedule=cosine'], "unknown config field on the command line: 'shedule'"),
    (['--config.trian.batch_size=8'], "unknown config field on the command line: 'trian'"),
    (['--config.train.batch_size=lots'], 'batch_size=lots: invalid literal for int()'),
    (['--config=configs/no_such_file.py'], 'no_such_file.py'),
    (
      ['--num_processes=2'],
      '--num_processes given without --coordinator_address, --process_id: pass all three',
    ),
    (
      ['--coordinator_address=127.0.0.1:1234', '--num_processes=2', '--process_id=2'],
      '--process_id=2 is out of range: it must be in [0, 1]',
    ),
    (
      ['--coordinator_address=127.0.0.1', '--num_processes=2', '--process_id=0'],
      "--coordinator_address='127.0.0.1' has no port",
    ),
    (['--cpu_devices=two'], "--cpu_devices='two' is not valid: use auto or a whole number"),
    (['--cpu_devices=3'], 'does not split over 3 devices: use a multiple of 3'),
  ],
)
def test_bad_flags_are_refused_with_a_clear_message(tmp_path, args, message):
  workdir = _users_workdir(tmp_path)
  result = tiny.main(workdir, *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stderr.startswith('pgnas_jax: ') and result.stderr.count('\n') == 1
  _untouched(workdir)


def test_validate_names_the_field():
  c = config_lib.get_config()
  c.search.chunk_size = 0
  with pytest.raises(errors.ConfigError, match='search.chunk_size'):
    config_lib.validate(c)
  c = config_lib.get_config()
  with c.unlocked():
    c.train.extra = 1
  with pytest.raises(errors.ConfigError, match='train.extra'):
    config_lib.validate(c)
  config_lib.validate(config_lib.get_config())


def test_every_config_file_validates():
  root = os.path.join(os.path.dirname(__file__), '..', 'configs')
  for name in os.listdir(root):
    if name.endswith('.py') and name != 'common.py':  # common.py: shared setups, no config
      config_lib.validate(config_lib.read_config_file(os.path.join(root, name)).get_config())
