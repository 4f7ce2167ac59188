"""The CPU kernels (pgnas_jax/backends/cpu/): oneDNN's convolutions and the one-pass
BatchNorm give XLA's and flax's results within float32 rounding, forward and every gradient,
on one device and on four; they are used exactly where the project hands work to them;
deterministic; and a run without them says why and keeps XLA's.

oneDNN picks its kernels by instruction set, so the same tests run again in subprocesses
(a crash there fails one test) with every call fenced (``PGNAS_JAX_CPU_KERNELS=checked``:
a write outside a buffer fails the call) under ``ONEDNN_MAX_CPU_ISA`` = SSE41, AVX2 and this
machine's best, and once with the library built with AddressSanitizer. A kernel that fails
its self-check is not used.

Tolerances: oneDNN and XLA add a convolution's products in different orders; on inputs of
unit scale the largest difference is a few float32 ulps of the largest value (measured below
4e-6 relative), so 2e-5 relative to the largest magnitude; the same for BatchNorm (measured
below 4e-6). A wrong tap, stride, padding, dilation, layout or BatchNorm term moves results
at the 1e-1 level."""

import contextlib
import ctypes
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from pgnas_jax import layers, parallel
from pgnas_jax.backends.cpu import kernels as cpu_kernels
from pgnas_jax.backends.cpu import ops as cpu_ops

# batch, size, in, out, kernel, stride, dilation: every kind the networks use (3x3 and 5x5,
# strides 1 and 2, the stem's one input channel, ImageNet's 7x7 stem at stride 2, 1x1
# shortcuts and strided 1x1 projections with fewer input channels than oneDNN's channel
# blocks of 8 (AVX2) and 16 (AVX-512), ENAS's dilated convs) and odd sizes and channel counts,
# where SAME pads one side more than the other. Batches split over 4 devices: a batch of 4
# leaves one image per device.
GEOMETRIES = [
  (4, 8, 3, 5, 3, 1, 1),
  (4, 9, 4, 6, 3, 2, 1),
  (4, 7, 1, 4, 3, 1, 1),
  (4, 8, 6, 3, 1, 2, 1),
  (8, 8, 6, 3, 1, 2, 1),
  (4, 9, 13, 24, 1, 2, 1),
  (8, 7, 5, 12, 1, 1, 1),
  (4, 16, 3, 8, 7, 2, 1),
  (4, 9, 3, 4, 5, 1, 2),
  (8, 10, 5, 4, 5, 2, 1),
]
# ... and with feature groups (ENAS's depthwise convs: one group per channel, dilated too)
GROUPED = [
  (4, 8, 6, 6, 3, 1, 1, 6),
  (4, 9, 4, 8, 5, 2, 1, 4),
  (4, 9, 6, 6, 3, 1, 2, 6),
  (4, 8, 6, 4, 3, 1, 1, 2),
]


def _reference(x, kernel, stride, dilation, groups=1):
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), 'SAME', rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
  )  # fmt: skip


class _Convolution(layers.Convolving):
  """A layer that convolves its input with a given kernel, as the project's layers do."""

  stride: int
  dilation: int = 1
  groups: int = 1

  def __call__(self, x, kernel):
    return self.convolve(x, kernel, self.stride, self.dilation, self.groups)


def _conv(x, kernel, stride, dilation, groups=1):
  return _Convolution(stride, dilation, groups).apply({}, x, kernel)


def _inputs(n, size, cin, cout, k, groups=1):
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, size, size, cin))
  return x, jax.random.normal(kk, (k, k, cin // groups, cout))


def _value_and_grads(mesh, conv):
  """Output and gradients of sum(sin(conv)) (a loss that weighs every output differently),
  jitted over ``mesh`` with the batch rows sharded, as the train step is."""

  def loss(x, kernel):
    y = conv(x, kernel)
    return jnp.sum(jnp.sin(y)), y

  def run(x, kernel):
    with cpu_ops.in_use(mesh):
      return jax.grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)

  return jax.jit(
    run,
    in_shardings=(parallel.batch_sharded(mesh), parallel.replicated(mesh)),
  )


def _relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_available_here():
  """The project installs oneDNN and a compiler (setup.cfg, README): here they must work."""
  assert cpu_kernels.available(), cpu_kernels._loaded()


@pytest.mark.parametrize('devices', [1, 4], ids=['1_device', '4_devices'])
@pytest.mark.parametrize(
  'geometry', [g + (1,) for g in GEOMETRIES] + GROUPED, ids=lambda g: 'x'.join(map(str, g))
)
def test_matches_xla_forward_and_gradients(geometry, devices):
  n, size, cin, cout, k, stride, dilation, groups = geometry
  x, kernel = _inputs(n, size, cin, cout, k, groups)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  ours = _value_and_grads(mesh, lambda a, b: _conv(a, b, stride, dilation, groups))
  program = ours.lower(x, kernel).as_text()
  assert 'pgnas_convolution_kernel_gradient' in program
  assert ('checked = true' in program) == (os.environ.get(cpu_kernels.SWITCH) == 'checked')
  (dx, dkernel), y = ours(x, kernel)

  def reference_loss(a, b):
    y = _reference(a, b, stride, dilation, groups)
    return jnp.sum(jnp.sin(y)), y

  (dx0, dkernel0), y0 = jax.jit(jax.grad(reference_loss, argnums=(0, 1), has_aux=True))(x, kernel)
  assert y.shape == y0.shape
  assert _relative(y, y0) < 2e-5
  assert _relative(dx, dx0) < 2e-5
  assert _relative(dkernel, dkernel0) < 2e-5


def test_used_only_where_handed_over():
  x, kernel = _inputs(2, 8, 4, 4, 3)
  mesh = parallel.make_mesh(jax.devices()[:1])

  def hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()

  def inside(fn):
    def run(*args):
      with cpu_ops.in_use(mesh):
        return fn(*args)

    return run

  assert 'pgnas_convolution_forward' in hlo(inside(lambda a, b: _conv(a, b, 1, 1)), x, kernel)
  # outside the context and in bfloat16: XLA's convolution
  assert 'pgnas_convolution' not in hlo(lambda a, b: _conv(a, b, 1, 1), x, kernel)
  half = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert 'pgnas_convolution' not in hlo(inside(lambda a, b: _conv(a, b, 1, 1)), *half)


def test_deterministic():
  x, kernel = _inputs(8, 14, 16, 16, 3)
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = _value_and_grads(mesh, lambda a, b: _conv(a, b, 1, 1))
  first, second = step(x, kernel), step(x, kernel)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def test_without_onednn_the_run_keeps_xla_and_says_why(monkeypatch, caplog):
  def missing():
    raise cpu_kernels.Unavailable('the package onednn-cpu-gomp is not installed')

  monkeypatch.setattr(cpu_kernels, 'build', missing)
  cpu_kernels._loaded.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_kernels.available()
    message = caplog.text
    assert 'onednn-cpu-gomp is not installed' in message
    assert "keeps XLA's convolutions" in message and 'pip install onednn-cpu-gomp' in message
    x, kernel = _inputs(2, 8, 4, 4, 3)
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = _value_and_grads(mesh, lambda a, b: _conv(a, b, 1, 1))
    assert 'pgnas_convolution' not in step.lower(x, kernel).as_text()
  finally:
    cpu_kernels._loaded.cache_clear()


@pytest.mark.parametrize('devices', [1, 4], ids=['1_device', '4_devices'])
def test_batch_norm_matches_flax(devices):
  """Training-mode BatchNorm: output, running statistics and every gradient as flax's (an
  input far from zero mean, where a careless variance or centring loses digits)."""
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 6, 6, 5))
  weights = jax.random.normal(jax.random.key(1), x.shape)
  params = {
    'scale': 1.0 + jax.random.normal(jax.random.key(2), (5,)),
    'bias': jax.random.normal(jax.random.key(3), (5,)),
  }
  stats = {'mean': jnp.full((5,), 0.5), 'var': jnp.full((5,), 2.0)}
  mesh = parallel.make_mesh(jax.devices()[:devices])

  def grads(module, inside=True):
    def loss(p, x):
      y, updates = module.apply(
        {'params': p, 'batch_stats': stats}, x, mutable=['batch_stats']
      )  # fmt: skip
      new = updates['batch_stats']  # a loss through the statistics too: their gradients
      extra = jnp.sum(new['mean'] * jnp.arange(5.0)) + jnp.sum(new['var'] * jnp.arange(5.0, 0, -1))
      return jnp.sum(jnp.sin(y) * weights) + extra, (y, new)

    def run(p, x):
      with cpu_ops.in_use(mesh) if inside else contextlib.nullcontext():
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)

    return jax.jit(run, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))

  ours = grads(layers.batch_norm(train=True))
  assert 'pgnas_channel_sums' in ours.lower(params, x).as_text()
  flax_bn = grads(layers.batch_norm(train=True), inside=False)
  assert 'pgnas_channel_sums' not in flax_bn.lower(params, x).as_text()
  for a, b in zip(jax.tree.leaves(ours(params, x)), jax.tree.leaves(flax_bn(params, x))):
    assert _relative(a, b) < 2e-5


@pytest.mark.parametrize(
  'case',
  [
    dict(train=False),  # running statistics
    dict(dtype=jnp.bfloat16),  # bfloat16 input
    dict(inside=False),  # no step builder chose the kernels
    dict(use_bias=False),  # the kernels' path needs a bias and a scale...
    dict(use_scale=False),
    dict(use_fast_variance=False),  # ... flax's fast variance ...
    dict(bn_dtype=jnp.bfloat16),  # ... and a float32 output
  ],
  ids=lambda case: ','.join(f'{k}={getattr(v, "__name__", v)}' for k, v in case.items()),
)
def test_batch_norm_elsewhere_is_flax(case):
  """Wherever the kernels do not compute what a BatchNorm asks for, flax's own code runs,
  bit for bit, whatever its attributes."""
  case = {'train': True, 'dtype': jnp.float32, 'inside': True, **case}
  x = (3.0 + jax.random.normal(jax.random.key(0), (4, 5, 5, 3))).astype(case.pop('dtype'))
  train, inside = case.pop('train'), case.pop('inside')
  attributes = {'dtype': case.pop('bn_dtype', None), **case}
  module = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **attributes)
  variables = module.init(jax.random.key(1), x)
  mesh = parallel.make_mesh(jax.devices()[:1])

  def run(x, kernels):
    with cpu_ops.in_use(mesh) if kernels else contextlib.nullcontext():
      return module.apply(variables, x, mutable=['batch_stats'])

  ours = jax.jit(lambda x: run(x, inside))
  assert 'pgnas_channel_sums' not in ours.lower(x).as_text()
  reference = jax.jit(lambda x: run(x, False))(x)
  for a, b in zip(jax.tree.leaves(ours(x)), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


# oneDNN's values of dnnl_get_effective_cpu_isa() for the ONEDNN_MAX_CPU_ISA names used here
_ISA_CODES = {'SSE41': 0x1, 'AVX2': 0x7}
_ROOT = os.path.join(os.path.dirname(__file__), '..')
_SANITIZED = '-fsanitize=address -fno-omit-frame-pointer -O1'
_KERNEL_TESTS = 'matches_xla or batch_norm_matches or kernels_as_asked'


def test_kernels_as_asked():
  """In the subprocesses below: oneDNN dispatches to the instruction set asked for, and the
  library is the one built with AddressSanitizer when asked."""
  onednn = ctypes.CDLL(str(cpu_kernels._package_file(cpu_kernels.RUNTIME_PACKAGE, '/libdnnl.so.3')))
  asked, isa = os.environ.get('ONEDNN_MAX_CPU_ISA'), onednn.dnnl_get_effective_cpu_isa()
  if asked:
    assert isa == _ISA_CODES[asked]
  elif ' avx2 ' in cpu_kernels._cpu_flags():  # no limit: the CPU's best, AVX2 or above
    assert isa >= _ISA_CODES['AVX2']
  sanitized = b'libasan' in cpu_kernels.build().read_bytes()  # among the needed libraries
  assert sanitized == ('-fsanitize=address' in os.environ.get(cpu_kernels.EXTRA_FLAGS, ''))


def _kernel_tests_in_subprocess(selection=_KERNEL_TESTS, **environment):
  """This file's kernel tests in a fresh process, every call fenced; a crash fails here
  (captured at the Python level only, so a native crash report reaches its stderr)."""
  env = {**os.environ, cpu_kernels.SWITCH: 'checked', **environment}
  pytest = [sys.executable, '-m', 'pytest', '-q', '--capture=sys', '-p', 'no:cacheprovider']
  done = subprocess.run(
    [*pytest, __file__, '-k', selection], env=env, cwd=_ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-12000:]
  assert ' passed' in done.stdout and 'skipped' not in done.stdout


@pytest.mark.long(30)
@pytest.mark.parametrize('isa', ['SSE41', 'AVX2', 'best'])
def test_under_instruction_set(isa):
  _kernel_tests_in_subprocess(**({} if isa == 'best' else {'ONEDNN_MAX_CPU_ISA': isa}))


def _compiler_file(name: str) -> str:
  found = subprocess.run(
    [cpu_kernels.compiler(), f'-print-file-name={name}'], capture_output=True, text=True
  )
  return found.stdout.strip()


@pytest.mark.long(40)
def test_under_address_sanitizer():
  """The library built with AddressSanitizer (its own code checked on every access, oneDNN's
  calls fenced), preloaded with the C++ runtime, whose exceptions it must intercept; on 4
  devices, where every handler runs (and XLA compiles about 4x slower under it)."""
  _kernel_tests_in_subprocess(
    f'({_KERNEL_TESTS}) and not 1_device',
    **{cpu_kernels.EXTRA_FLAGS: _SANITIZED},
    LD_PRELOAD=f'{_compiler_file("libasan.so")} {_compiler_file("libstdc++.so")}',
    ASAN_OPTIONS='detect_leaks=0',  # Python's and XLA's caches live until exit
  )


def test_fence_catches_onednn_strided_1x1_overrun():
  """The fence finds the fault it was built for: oneDNN 3.2's AVX2 kernel gradient of a
  strided 1x1 convolution with 6 input channels (below its block of 8), handed over as it is
  (without ``_as_handed``), writes past its scratchpad; the self-check says so."""
  code = (
    'from pgnas_jax.backends.cpu import kernels; assert kernels.available(); '
    'print(kernels._self_check((2, 8, 8, 6), (1, 1, 6, 3), 2, 1, 1))'
  )
  env = {**os.environ, 'ONEDNN_MAX_CPU_ISA': 'AVX2'}
  done = subprocess.run(
    [sys.executable, '-c', code], env=env, cwd=_ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-4000:]
  assert 'jit_1x1:avx2 wrote' in done.stdout and 'past its scratchpad buffer' in done.stdout


def test_kernel_failing_its_self_check_is_not_used(monkeypatch, caplog, tmp_path):
  """One line names the geometry and why; the program keeps XLA's convolution there, with
  XLA's results; the other geometries stay on oneDNN."""
  monkeypatch.setattr(cpu_kernels, '_verdicts_path', lambda: tmp_path / 'verdicts.json')
  refused = (4, 9, 4, 6, 3, 2, 1)
  n, size, cin, cout, k, stride, dilation = refused
  real_check = cpu_kernels._self_check

  def check(*geometry):
    if geometry == ((n, size, size, cin), (k, k, cin, cout), stride, dilation, 1):
      return 'a refusal for this test'
    return real_check(*geometry)

  monkeypatch.setattr(cpu_kernels, '_self_check', check)
  cpu_kernels._passes.cache_clear()
  try:
    x, kernel = _inputs(n, size, cin, cout, k)
    x2, kernel2 = _inputs(n, size, cin, cout, 3)
    mesh = parallel.make_mesh(jax.devices()[:1])

    def two_convs(a, b):
      return _conv(a, b, stride, dilation) + _conv(x2, kernel2, 2, 2)

    with caplog.at_level(logging.WARNING):
      ours = _value_and_grads(mesh, two_convs)
      program = ours.lower(x, kernel).as_text()
      ours.lower(x, kernel)  # traced again: no second line
    assert program.count('pgnas_convolution_forward') == 1  # the other conv
    lines = [r.getMessage() for r in caplog.records if 'self-check' in r.getMessage()]
    assert len(lines) == 1 and 'a refusal for this test' in lines[0] and "keeps XLA's" in lines[0]
    assert f'{n}x{size}x{size}x{cin}' in lines[0]
    (dx, dkernel), _ = ours(x, kernel)

    def reference_loss(a, b):
      y = _reference(a, b, stride, dilation) + _reference(x2, kernel2, 2, 2)
      return jnp.sum(jnp.sin(y)), y

    (dx0, dkernel0), _ = jax.jit(jax.grad(reference_loss, argnums=(0, 1), has_aux=True))(x, kernel)
    assert _relative(dx, dx0) < 2e-5 and _relative(dkernel, dkernel0) < 2e-5
  finally:
    cpu_kernels._passes.cache_clear()


def test_self_check_verdicts_are_kept_for_later_processes(monkeypatch, tmp_path):
  """A geometry checked once is not checked again by a later process (its verdict, pass or
  failure, is read back); another ONEDNN_* setting or a damaged file checks again."""
  path = tmp_path / 'verdicts.json'
  monkeypatch.setattr(cpu_kernels, '_verdicts_path', lambda: path)
  checked = []

  def check(*geometry):
    checked.append(geometry)
    return 'refused here' if geometry[2] == 2 else None

  monkeypatch.setattr(cpu_kernels, '_self_check', check)
  passing = ((2, 8, 8, 4), (3, 3, 4, 4), 1, 1, 1)
  failing = ((2, 8, 8, 4), (3, 3, 4, 4), 2, 1, 1)

  def new_process():
    cpu_kernels._passes.cache_clear()
    return [cpu_kernels._passes('convolution', *g) for g in (passing, failing)]

  try:
    assert new_process() == [True, False] and len(checked) == 2
    assert new_process() == [True, False] and len(checked) == 2  # read back, not checked
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
    assert new_process() == [True, False] and len(checked) == 4
    path.write_text('{"cut')
    assert new_process() == [True, False] and len(checked) == 6
    assert len(json.loads(path.read_text())) == 2  # the damaged file replaced
  finally:
    cpu_kernels._passes.cache_clear()


@pytest.mark.parametrize('cached', ['garbage', 'another library'])
def test_a_cached_library_that_is_not_ours_is_built_again(tmp_path, cached):
  """A file at the cache's path that does not load, or loads without our handlers (a stale
  or foreign library), is replaced by a fresh build, with one warning; the kernels work."""
  code = (
    'import _ctypes, shutil, sys\n'
    'from pgnas_jax.backends.cpu import kernels\n'
    'target = kernels._recipe()[0]\n'
    'target.parent.mkdir(parents=True)\n'
    'if sys.argv[1] == "garbage":\n'
    '  target.write_bytes(b"not a library")\n'
    'else:\n'
    '  shutil.copyfile(_ctypes.__file__, target)  # a shared library, without our handlers\n'
    'assert kernels.available(), kernels._loaded()\n'
    'print(kernels._recipe()[0].read_bytes()[:4] == b"\\x7fELF")\n'
  )
  env = {**os.environ, 'XDG_CACHE_HOME': str(tmp_path), cpu_kernels.EXTRA_FLAGS: '-O0'}
  done = subprocess.run(
    [sys.executable, '-c', code, cached], env=env, cwd=_ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == 'True'
  lines = [line for line in done.stderr.splitlines() if 'cached CPU kernel library' in line]
  assert len(lines) == 1 and 'building it again' in lines[0], done.stderr[-3000:]


def test_loading_again_registers_the_same_handlers():
  """Loading the library again in one process (as after ``_loaded.cache_clear()``) hands
  XLA the same handlers: registering others under the same names is an error."""
  cpu_kernels._loaded.cache_clear()
  assert cpu_kernels.available(), cpu_kernels._loaded()
  x, kernel = _inputs(2, 8, 4, 4, 3)
  step = _value_and_grads(parallel.make_mesh(jax.devices()[:1]), lambda a, b: _conv(a, b, 1, 1))
  assert 'pgnas_convolution_forward' in step.lower(x, kernel).as_text()
  _, y = step(x, kernel)
  np.testing.assert_allclose(y, _reference(x, kernel, 1, 1), rtol=2e-5, atol=2e-5)
