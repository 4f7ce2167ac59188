"""Four simulated CPU devices for every test, so multi-device code paths run here; tests that
need one device build their mesh from ``jax.devices()[:1]``."""

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time

# The suite's programs are small and most are compiled once or twice: compiling is most of
# its time. LLVM's first optimisation level compiles them in about two thirds of the CPU time
# of XLA's default (3) and runs them as fast (level 0 compiles faster still but runs the
# random-bit generators 20 times slower). Float rounding can differ from the default level's,
# so every process of the suite, the ones it starts included (`tiny.ONE_DEVICE`), runs at
# this level: each comparison a test makes is between programs compiled alike, and the
# statistical tolerances hold at either level (tests/test_precision.py).
os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    '--xla_backend_optimization_level=1',
    '--xla_force_host_platform_device_count=4',
  ]
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the suite and every process it starts (tiny runs of
# the main job compile the same functions again and again): a compiled function is keyed by
# its HLO and the JAX version, so a hit runs the very same executable, bit for bit.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  os.path.join(tempfile.gettempdir(), f'pgnas_jax_test_compilation_cache_{os.getuid()}'),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax
import pytest

from pgnas_jax.supernets.shake_shake import ShakeShakeNet


def pytest_addoption(parser):
  parser.addoption(
    '--time-limit',
    type=float,
    default=None,
    help='seconds the whole run may take; past them it names the tests still running, '
    'kills the workers and fails',
  )


_RUNNING = {}  # node id -> location, of the tests started and not finished (workers' too)


def pytest_runtest_logstart(nodeid, location):
  _RUNNING[nodeid] = location


def pytest_runtest_logfinish(nodeid, location):
  _RUNNING.pop(nodeid, None)


def pytest_handlecrashitem(crashitem, report, sched):
  _RUNNING.pop(crashitem, None)  # the test a dead worker was running: failed, not running


def _children(pid: int) -> list[int]:
  try:
    tasks = os.listdir(f'/proc/{pid}/task')
  except OSError:
    return []
  found = []
  for task in tasks:
    with open(f'/proc/{pid}/task/{task}/children') as f:
      found += [int(c) for c in f.read().split()]
  return found + [g for c in found for g in _children(c)]


CRASH_GRACE = 30  # seconds the other workers may go on after one died


def _end_run(why: str):
  """Names the tests still running, has the workers print their stacks, ends them and the
  run (exit status 3)."""
  running = ', '.join(sorted(_RUNNING)) or 'none (the workers were idle)'
  sys.__stderr__.write(f'\n{why}. Still running: {running}\n')
  workers = _children(os.getpid())
  for sig in (signal.SIGUSR1, signal.SIGKILL):  # the workers print their stacks, then end
    for child in workers:
      try:
        os.kill(child, sig)
      except ProcessLookupError:
        pass
    time.sleep(2)
  os._exit(3)


def pytest_configure(config):
  if hasattr(config, 'workerinput'):  # an xdist worker: its stacks on the controller's signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _end_run_in(seconds: float, why: str):
  timer = threading.Timer(seconds, _end_run, (why,))
  timer.daemon = True
  timer.start()


def pytest_sessionstart(session):
  """The controlling process (not an xdist worker) ends a run that outlasts --time-limit: CI
  then fails with the names of the tests that hung instead of running into its own limit."""
  limit = session.config.getoption('--time-limit')
  if limit and not hasattr(session.config, 'workerinput'):
    _end_run_in(limit, f'The test run passed its --time-limit of {limit:.0f} s')


def pytest_testnodedown(node, error):
  """A worker died (with --max-worker-restart=0 xdist fails the test it was running and
  starts no other): the run ends once the others finish their queues, or CRASH_GRACE
  seconds from now, whichever comes first."""
  if error:
    _end_run_in(CRASH_GRACE, f'Worker {node.gateway.id} died {CRASH_GRACE} s ago ({error})')


def pytest_collection_modifyitems(items):
  """Tests marked `long(seconds)` first, longest first (the seconds measured on the 2-core
  machine, setup included), the rest in their order: under `-n 2` the long end-to-end runs
  then overlap the many short tests instead of ending the suite on one worker."""

  def seconds(item):
    mark = item.get_closest_marker('long')
    return mark.args[0] if mark else 0

  items.sort(key=lambda item: -seconds(item))


@pytest.fixture(scope='session')
def tiny_net():
  """A two-stage super-network small enough for unit tests."""
  return ShakeShakeNet(
    num_classes=3, stem_width=4, widths=(4, 8), blocks_per_stage=1, kernel_sizes=(3, 3), shake=True
  )


@pytest.fixture(scope='session')
def tiny_variables(tiny_net):
  images = jax.numpy.zeros((1, 8, 8, 2))
  return jax.jit(lambda k: tiny_net.init({'params': k}, images, train=False))(jax.random.key(0))
