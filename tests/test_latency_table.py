"""Predicted latency (``latency_table``, SPEC section 7): the table's interpolation, a
candidate's prediction against its compact network measured whole, the device cache, the
latency budget and target end to end, a resumed run predicting from its own table, and bad
values refused before the workdir exists.

Timings here come from a fake clock (``_fake_ms``): a call takes 0.25 ms; a convolution
0.01 ms, 0.05 ms more when its width is not a multiple of 8, and 1e-7 ms per
multiply-accumulate; a whole network 2 ms more and its convolutions' time alone or 0.6 of
it (run side by side). The table's line through two whole networks then fits exactly, so
its predictions must equal this clock's measurements of the candidates' compact networks: a
table that misses a convolution, a width or the line does not. Real timings are measured
by ``benchmarks/latency_prediction.py``."""

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import tiny

from pgnas_jax import budget, errors, latency_table, layers, pipeline
from pgnas_jax import config as config_lib
from pgnas_jax.compact import latency as measuring
from pgnas_jax.compact import derived


def _conv_ms(seen) -> float:
  _, (batch, height, width, inputs), kernel, (stride, _), _, groups, _ = seen
  pixels = math.ceil(height / stride) * math.ceil(width / stride)
  odd = 0.05 * ((inputs // groups) % 8 != 0)  # a width off the vector length costs more
  return 0.01 + odd + 1e-7 * batch * pixels * kernel[0] * kernel[1] * (inputs // groups) * kernel[3]


def _fake_ms(fn, *args, overlap=1.0):
  """0.25 ms a call; a compact network (a ``functools.partial``) adds 2 ms and runs its
  convolutions ``overlap`` of their time alone."""
  with derived.recording() as seen:  # a new function each time: traced, not cached
    jax.eval_shape(lambda *a: fn(*a), *args)
  convs = sum(_conv_ms(s) for s in seen if s[0] == 'conv')
  if isinstance(fn, functools.partial):
    return 0.25 + 2.0 + overlap * convs
  return 0.25 + convs


class _Calls(list):
  overlap: float


@pytest.fixture(params=[1.0, 0.6], ids=['convs_one_after_another', 'convs_side_by_side'])
def fake_clock(request, monkeypatch, tmp_path):
  """The fake clock in place of every latency measurement, and a device cache of its own;
  ``calls`` counts the programs timed."""
  calls = _Calls()

  def timer(fn, *args, repeats=None):
    calls.append(1)
    return lambda: _fake_ms(fn, *args, overlap=request.param)

  monkeypatch.setattr(measuring, 'timer', timer)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  calls.overlap = request.param
  return calls


@pytest.mark.parametrize('family', list(tiny.FAMILIES))
def test_a_candidates_prediction_is_its_compact_network_measured_whole(family, fake_clock):
  """For 6 candidates of each family's tiny member, the prediction equals the clock's
  measurement of the candidate's compact network (relative 1e-9), whether a whole network
  runs its convolutions one after another or partly side by side (the line's slope);
  every group's per-channel cost is >= 0 and some are > 0."""
  model, init_variables, variables, space, images = tiny.family_case(family)
  predictor = latency_table.Predictor(model, variables, images.shape[1:], 16)
  table = predictor.table(space, 1)
  assert table.scale == pytest.approx(fake_clock.overlap) and table.call_ms == 0.25
  assert table.offset_ms == pytest.approx(2.25)
  masks = [tiny.candidate_mask(space, p, seed) for p, seed in [(0.3, 1), (0.5, 2), (0.7, 3)]]
  masks += [tiny.candidate_mask(space, p, seed) for p, seed in [(0.2, 4), (0.6, 5), (0.9, 6)]]
  for mask in masks:
    convs = predictor.convs(mask)
    assert predictor.convs(mask) == convs  # traced again, not read from a cached trace
    entries = predictor.measured(table.entries, convs)
    predicted = table._replace(entries=entries).predict(convs)
    assert predicted == pytest.approx(predictor.whole_ms([mask])[0][0], rel=1e-9)
  assert min(table.channel_ms) >= 0 and max(table.channel_ms) > 0
  assert len(table.channel_ms) == space.num_groups
  assert table.smallest_ms < table.full_ms


@pytest.mark.parametrize('fake_clock', [0.6], indirect=True)
def test_entries_are_measured_once_per_device(fake_clock):
  """A second table of the same network measures only its two whole networks and the cost
  of a call: every convolution comes from the device cache."""
  model, _, variables, space, images = tiny.family_case('shake_shake')
  first = latency_table.Predictor(model, variables, images.shape[1:], 16).table(space, 1)
  measured_first = len(fake_clock)
  second = latency_table.Predictor(model, variables, images.shape[1:], 16).table(space, 1)
  assert measured_first > 3 + 4 and len(fake_clock) == measured_first + 3
  assert first == second


def _steered(fields=None):
  return tiny.config(
    {
      'objective.target_latency_ms': '80%',
      'train.num_steps': 8,
      'search.num_candidates': 8,
      'export.latency': True,
      **(fields or {}),
    }
  )


@pytest.mark.parametrize('fake_clock', [0.6], indirect=True)
def test_a_latency_target_steers_training_and_bounds_the_winner(tmp_path, fake_clock):
  """The main job with a latency target: the expected latency is logged and held at its
  ceiling, which reaches the target; every candidate has its predicted latency; the winner
  fits the target; the accuracy-latency front is in pareto.json and report.md with each
  point's measured latency (here the clock's, equal to the prediction); the run's table is
  kept in the workdir."""
  result = pipeline.run(_steered(), str(tmp_path))
  metrics = tiny.metrics(tmp_path)
  assert all(m['expected_latency'] <= m['target_latency'] + 1e-5 for m in metrics)
  assert metrics[-1]['target_latency'] == pytest.approx(0.8, abs=1e-5)
  records = tiny.candidates(tmp_path)
  assert len(records) == 8 and all(r['latency_ms'] > 0 for r in records)
  table = latency_table.read(str(tmp_path))
  arch = result.arch
  assert arch['budget']['max_latency_ms'] == pytest.approx(0.8 * table.full_ms)
  assert arch['predicted_latency_ms'] <= arch['budget']['max_latency_ms']
  assert arch['latency_ms']['compact']['128'] == pytest.approx(arch['predicted_latency_ms'])
  front = json.loads((tmp_path / 'search' / 'pareto.json').read_text())['latency_ms']
  assert front and all(
    p['measured_latency_ms'] == pytest.approx(p['latency_ms'], rel=1e-9) for p in front
  )
  assert 'accuracy against predicted latency front' in (tmp_path / 'report.md').read_text()


@pytest.mark.parametrize('fake_clock', [0.6], indirect=True)
def test_a_resumed_run_predicts_from_its_own_table(tmp_path, fake_clock, monkeypatch):
  """A run whose search is scored again on a machine twice as slow (another clock, an empty
  cache) records the same predicted latencies: they come from the workdir's table."""
  fields = {'objective.target_latency_ms': 0, 'search.predict_latency': True}
  config = _steered({**fields, 'export.latency': False})
  pipeline.run(config, str(tmp_path / 'w'))
  first = tiny.candidates(tmp_path / 'w')
  for name in ('report.md', 'search/candidates.jsonl'):
    (tmp_path / 'w' / name).unlink()
  twice_as_slow = lambda fn, *a, repeats=None: lambda: 2 * _fake_ms(fn, *a, overlap=0.6)
  monkeypatch.setattr(measuring, 'timer', twice_as_slow)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'another_cache'))
  pipeline.run(config, str(tmp_path / 'w'))
  assert tiny.candidates(tmp_path / 'w') == first


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'objective.target_latency_ms': -1.0}, 'objective.target_latency_ms=-1.0 is out of range'),
    ({'search.max_latency_ms': '150%'}, "search.max_latency_ms='150%' is out of range"),
    ({'search.max_latency_ms': float('nan')}, 'search.max_latency_ms=nan is out of range'),
  ],
)
def test_a_latency_value_out_of_range_is_refused(fields, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(tiny.default_config(fields))


@pytest.mark.parametrize('fake_clock', [0.6], indirect=True)
def test_a_latency_target_below_the_smallest_network_is_refused_before_the_workdir(
  tmp_path, fake_clock
):
  with pytest.raises(errors.ConfigError, match='the smallest candidate is predicted at'):
    pipeline.run(_steered({'objective.target_latency_ms': 0.001}), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_a_network_without_a_compact_network_cannot_predict_latency():
  """An op the compact derivation cannot follow (a cumulative sum over the image) is named
  in the one-line refusal."""

  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = jnp.cumsum(layers.SearchableConv(4, 3, name='conv')(x), axis=1)
      return layers.Dense(10, name='head')(jnp.mean(x, axis=(1, 2)))

  config = tiny.default_config({'search.predict_latency': True})
  with pytest.raises(errors.ConfigError, match="cannot follow the op 'cumsum'"):
    latency_table.for_run(config, Custom(), (8, 8, 1), None)


def test_the_latency_budget_takes_milliseconds_or_a_share():
  c = tiny.default_config({'search.max_latency_ms': '50%'})
  assert budget.Budget.from_config(c, 100, 100, 30.0).max_latency_ms == 15.0
  c.search.max_latency_ms = 12.5
  limit = budget.Budget.from_config(c, 100, 100, 30.0)
  assert limit.fits({'params': 1, 'flops': 1, 'latency_ms': 12.5})
  assert not limit.fits({'params': 1, 'flops': 1, 'latency_ms': 12.6})
  assert not limit.fits({'params': 1, 'flops': 1})  # no prediction: not known to fit
  c.objective.target_latency_ms = 8.0  # the search's own budget wins over the target
  assert budget.Budget.from_config(c, 100, 100, 30.0).max_latency_ms == 12.5


@pytest.mark.parametrize('fake_clock', [0.6], indirect=True)
def test_a_latency_budget_added_to_a_finished_run_reuses_its_candidates(tmp_path, fake_clock):
  """A finished run without latency, run again with ``search.max_latency_ms``: its scored
  candidates are kept (same scores), each gains its prediction, and the winner is the best
  that fits the new budget."""
  config = tiny.config({'search.num_candidates': 8})
  pipeline.run(config, str(tmp_path))
  before = tiny.candidates(tmp_path)
  assert not any('latency_ms' in r for r in before)
  config.search.max_latency_ms = '95%'
  result = pipeline.run(config, str(tmp_path))
  after = tiny.candidates(tmp_path)
  assert [(r['index'], r['val_acc']) for r in after] == [(r['index'], r['val_acc']) for r in before]
  limit = result.arch['budget']['max_latency_ms']
  fitting = [r for r in after if r['latency_ms'] <= limit]
  assert [r['fits'] for r in after] == [r['latency_ms'] <= limit for r in after]
  best = min(fitting, key=lambda r: (-r['val_acc'], r['params'], r['index']))
  assert result.arch['index'] == best['index']
