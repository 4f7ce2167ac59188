"""The CPU train step's convolutions on oneDNN and BatchNorm's sums in one pass, as XLA FFI
calls.

XLA:CPU runs a convolution on Eigen (or YNNPACK), and the weight gradient only after
transposing its operands; it sums BatchNorm's statistics, forward and backward, through
reduce-windows that took a fifth of the default network's train step per core. oneDNN's
convolutions, forward and both gradients, took a half to two thirds of XLA's time per core
on every conv of the default network; one pass over the rows gives a BatchNorm's sums
(docs/benchmarks.md, issue 17). ``kernels.cc`` holds both as XLA FFI handlers; this
module builds it once per source, library, compiler flags and CPU with the host's C++
compiler (a few seconds, cached under ``~/.cache/pgnas_jax``), registers the handlers and
offers ``conv`` and ``batch_norm``, each a ``jax.custom_vjp`` over its calls.

Where: ``ops.in_use(mesh)`` chooses them for what a step builder traces in it
(``train.make_train_step``, and ``search.make_chunk_scorer``'s lone candidate), on a CPU
mesh, in float32: every ``layers.Convolving`` convolution (grouped and depthwise ones
included) and flax BatchNorms in training mode. Everything else (accelerators, bfloat16,
the vmapped scorer, BatchNorm recalibration, fine-tuning, the export) keeps XLA's ops. On a
mesh of several devices the calls run per device (``shard_map`` over the batch rows) and
the kernel gradients and BatchNorm sums are summed across devices, as XLA's partitioned ops
do.

Built on first use, not at install time: ``-march=native`` ties the library to the CPU that
builds it, and one installation (a shared home, a container image, a cluster's virtual
environment) runs on hosts of several CPU kinds; the cache keeps one library per CPU
(measured: a build takes 8 to 9 s on an AMD EPYC (AVX2), paid once per CPU and
source version, against a 20-minute default run).

Numbers: oneDNN and the one-pass sums add in another order than XLA, so results change by
float32 rounding against XLA's ops (BatchNorm keeps flax's formulas: the fast variance
``E[x^2] - E[x]^2`` and its normalisation, with sums accumulated in double); they are
deterministic for a given number of threads per call (one per device when the CPU is split
into one device per core, ``host_devices``). Without oneDNN or a compiler
(``PGNAS_JAX_CPU_KERNELS=xla`` forces that), the run keeps XLA's ops and says why once.

Trust: oneDNN picks its kernels by instruction set, so a kernel this machine runs may never
have run where the project was tested. Before a convolution or a BatchNorm's sums is handed
over, its per-device geometry passes a one-time self-check (``_self_check``): oneDNN's calls
on random inputs, each on fenced copies of its buffers (``kernels.cc``: a write outside
a buffer or into an input fails the call), must match XLA's within ``SELF_CHECK_TOLERANCE``.
One that fails keeps XLA's op, with one logged line saying why. Verdicts are kept beside the
cached library (``<library>.verdicts.json``, per geometry, threads per call and ``ONEDNN_*``
setting), so a restarted process or the next run on this CPU checks only new geometries
(SupNet-D-121 has 132: 68 s per start, docs/scaling.md). ``PGNAS_JAX_CPU_KERNELS=checked``
runs every call fenced (slow; for tests and for hunting a fault). Strided 1x1 convolutions
are handed over as unstrided ones on every stride-th pixel (``_as_handed``): oneDNN 3.2's
own reduction to unit stride writes past its scratchpad when a 1x1 kernel gradient has
fewer input channels than its channel block (8 with AVX2, 16 with AVX-512; oneDNN issue
6035), and the subsampled convolution is the same arithmetic.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import layers, parallel
from pgnas_jax import workdir as workdir_lib

RUNTIME_PACKAGE = 'onednn-cpu-gomp'
HEADERS_PACKAGE = 'onednn-devel-cpu-gomp'
SWITCH = 'PGNAS_JAX_CPU_KERNELS'  # 'xla': keep XLA's ops; 'checked': fence every call
EXTRA_FLAGS = 'PGNAS_JAX_CPU_KERNELS_FLAGS'  # more compiler flags, e.g. -fsanitize=address
SELF_CHECK_TOLERANCE = 1e-3  # of the largest magnitude; float32 reordering stays below 1e-5
SOURCE = pathlib.Path(__file__).with_suffix('.cc')
TARGETS = {
  'forward': 'pgnas_convolution_forward',
  'input_gradient': 'pgnas_convolution_input_gradient',
  'kernel_gradient': 'pgnas_convolution_kernel_gradient',
  'channel_sums': 'pgnas_channel_sums',
}
INSTALL_HINT = (
  f'pip install {RUNTIME_PACKAGE}==2023.2.0 {HEADERS_PACKAGE}==2023.2.0 (the project pins '
  'them on x86-64 Linux) and a C++ compiler (apt-get install g++)'
)


class Unavailable(RuntimeError):
  """The kernels cannot be built or loaded here; the message says why."""


def _package_file(package: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.distribution(package).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f'the package {package} is not installed') from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise Unavailable(f'the package {package} has no {suffix}')


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), '')
  except OSError:
    return ''


def compiler() -> str:
  """The C++ compiler that builds the library: $CXX, else g++ or c++ on the PATH."""
  found = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not found:
    raise Unavailable('no C++ compiler (g++) on the PATH')
  return found


def _recipe() -> tuple:
  """(where the library is cached, the command that builds it: compiler, flags, the output
  path last but the link flags), for this source, compiler, flags and CPU."""
  compiler_path = compiler()
  header = _package_file(HEADERS_PACKAGE, '/oneapi/dnnl/dnnl.hpp')
  library = _package_file(RUNTIME_PACKAGE, '/libdnnl.so.3')
  include_dir, library_dir = header.parents[2], library.parent
  flags = ['-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w']
  flags += os.environ.get(EXTRA_FLAGS, '').split()
  includes = [f'-I{include_dir}', f'-I{jax.ffi.include_dir()}']
  links = [f'-L{library_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{library_dir}']
  identity = hashlib.sha256(
    SOURCE.read_bytes()
    + '|'.join([jax.__version__, compiler_path, *flags, *includes, *links, _cpu_flags()]).encode()
  ).hexdigest()[:16]  # -march=native: a cache shared by different CPUs keeps one per CPU
  return (
    pathlib.Path(workdir_lib.cache_dir()) / f'cpu_kernels-{identity}.so',
    [compiler_path, *flags, *includes],
    links,
  )


def build(again: bool = False) -> pathlib.Path:
  """The handlers' shared library, compiled on first use (``again``: even if cached);
  raises ``Unavailable``."""
  target, command, links = _recipe()
  if target.exists() and not again:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(f'.{os.getpid()}.partial')
  logging.info('building the CPU kernels once for this CPU: %s', target)
  done = subprocess.run(
    [*command, str(SOURCE), '-o', str(partial), *links], capture_output=True, text=True
  )
  if done.returncode:
    partial.unlink(missing_ok=True)
    raise Unavailable(f'compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}')
  os.replace(partial, target)  # atomic: processes building at once agree on the file
  return target


def _open(path: pathlib.Path, fresh_name: bool = False):
  """The library at ``path`` with every handler; OSError or AttributeError when it does not
  load or lacks one. ``fresh_name``: opened through a copy of its own, since the dynamic
  loader keeps a library by its path and would not read a file rebuilt there again."""
  if not fresh_name:
    library = ctypes.CDLL(str(path))
  else:
    alias = path.with_suffix(f'.{os.getpid()}.{time.monotonic_ns()}.so')
    shutil.copyfile(path, alias)
    try:
      library = ctypes.CDLL(str(alias))
    finally:
      alias.unlink()
  for name in TARGETS.values():
    getattr(library, name)
  return library


_OPENED = {}  # path -> the library opened from it: registering handlers again must name it


def _library():
  """The cached library, built again once if it does not load or is not this source's (a
  stale or foreign file at its path); raises ``Unavailable``."""
  path = build()
  if path in _OPENED:
    return _OPENED[path]
  try:
    library = _open(path)
  except (OSError, AttributeError) as e:
    logging.warning(
      'the cached CPU kernel library %s does not load or lacks its handlers (%s): building '
      'it again',
      path,
      e,
    )
    try:
      library = _open(build(again=True), fresh_name=True)
    except (OSError, AttributeError) as e:
      raise Unavailable(f'the CPU kernel library built at {path} does not load ({e})') from None
  _OPENED[path] = library
  return library


@functools.cache
def _loaded() -> str | None:
  """Registers the handlers once per process; None when they can be, else why not."""
  if os.environ.get(SWITCH, '').lower() == 'xla':
    return f'{SWITCH}=xla'
  try:
    library = _library()
  except Unavailable as e:
    logging.warning(
      "oneDNN's convolutions are unavailable (%s); this run keeps XLA's convolutions and "
      'BatchNorm on the CPU, which train about 1.7x slower.%s',
      e,
      '' if 'does not load' in str(e) else f' To use them: {INSTALL_HINT}.',
    )
    return str(e)
  for name in TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), 'cpu')
  return None


def available() -> bool:
  return _loaded() is None


def _threads_per_call() -> int:
  cpus = len(jax.local_devices(backend='cpu'))
  return max(1, len(os.sched_getaffinity(0)) // cpus)


def _per_device_rows(rows: int, mesh) -> int:
  return rows if mesh is None else rows // mesh.size


def _as_handed(x_shape, kernel_shape, stride: int):
  """The input shape and stride a convolution is handed to oneDNN with: a strided 1x1 as an
  unstrided one on every stride-th pixel (SAME pads a 1x1 by nothing), see the docstring."""
  if tuple(kernel_shape[:2]) == (1, 1) and stride > 1:
    n, h, w, c = x_shape
    return (n, -(-h // stride), -(-w // stride), c), 1
  return tuple(x_shape), stride


def handles_conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int, groups: int, mesh):
  """Whether ``conv`` runs this convolution here, split over ``mesh`` (None: the caller is
  per device): float32, and its per-device geometry passed the self-check on this CPU."""
  if not all(a.dtype == jnp.float32 for a in (x, kernel)):
    return False
  x_shape, handed_stride = _as_handed(x.shape, kernel.shape, stride)
  x_shape = (_per_device_rows(x_shape[0], mesh), *x_shape[1:])
  return _passes('convolution', x_shape, tuple(kernel.shape), handed_stride, dilation, groups)


def handles_batch_norm(x: jax.Array, mesh) -> bool:
  """Whether ``batch_norm`` runs this training-mode BatchNorm here (as ``handles_conv``)."""
  if x.dtype != jnp.float32:
    return False
  return _passes('BatchNorm sums', (_per_device_rows(x.shape[0], mesh), *x.shape[1:]))


@functools.cache
def _passes(kind: str, *geometry) -> bool:
  key = json.dumps([kind, geometry, _threads_per_call(), _onednn_settings()], default=int)
  kept = _read_verdicts()
  if key in kept:
    why = kept[key]
  else:
    with jax.ensure_compile_time_eval():  # concrete calls, also while a step is traced
      why = _self_check(*geometry) if kind == 'convolution' else _self_check_sums(*geometry)
    _keep_verdict(key, why)
  if why:
    logging.warning(
      "oneDNN's %s of %s failed its self-check on this CPU (%s): this run keeps XLA's op "
      'there, correct and slower.',
      kind,
      _described(*geometry),
      why,
    )
  return not why


def _onednn_settings() -> list:
  """The ``ONEDNN_*`` environment (``ONEDNN_MAX_CPU_ISA`` changes the kernels chosen)."""
  return sorted((k, v) for k, v in os.environ.items() if k.startswith('ONEDNN_'))


def _verdicts_path() -> pathlib.Path:
  """Beside the library: its name holds the source, compiler, flags and CPU it is for."""
  return _recipe()[0].with_suffix('.verdicts.json')


def _read_verdicts() -> dict:
  """Self-check verdicts kept by earlier processes (key -> None or why it failed); a
  missing or damaged file is an empty one (every geometry is checked again)."""
  try:
    kept = json.loads(_verdicts_path().read_text())
  except (OSError, ValueError):
    return {}
  return kept if isinstance(kept, dict) else {}


def _keep_verdict(key: str, why: str | None) -> None:
  """Adds one verdict to the file (written whole under a name of this process and renamed:
  processes writing at once may drop each other's newest verdicts, which are checked again
  at the next start)."""
  path = _verdicts_path()
  verdicts = {**_read_verdicts(), key: why}
  partial = path.with_suffix(f'.{os.getpid()}.partial')
  try:
    partial.write_text(json.dumps(verdicts, indent=0))
    os.replace(partial, path)
  except OSError as e:  # a read-only cache: checked again next time
    logging.info('could not keep the self-check verdict in %s (%s)', path, e)


def _described(x_shape, kernel_shape=None, stride=None, dilation=None, groups=None) -> str:
  text = f'an input of {"x".join(map(str, x_shape))} per device'
  if kernel_shape is None:
    return text
  kernel = 'x'.join(map(str, kernel_shape))
  return f'{text}, kernel {kernel}, stride {stride}, dilation {dilation}, groups {groups}'


def _relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))


def _on_cpu(*arrays):
  return jax.device_put(arrays, jax.local_devices(backend='cpu')[0])


def _self_check(x_shape, kernel_shape, stride: int, dilation: int, groups: int) -> str | None:
  """None when oneDNN's forward, input gradient and kernel gradient of this per-device
  convolution, called fenced on random inputs, match XLA's; else what went wrong."""
  rng = np.random.default_rng(0)
  y_shape = _output_shape(x_shape, kernel_shape, stride)
  x, kernel, dy = _on_cpu(
    *(rng.standard_normal(s, np.float32) for s in (x_shape, kernel_shape, y_shape))
  )
  attributes = _attributes(x_shape, kernel_shape, stride, dilation, groups, checked=True)

  def both(x, kernel, dy):
    y, vjp = jax.vjp(lambda a, b: layers.xla_conv(a, b, stride, dilation, groups), x, kernel)
    ours = (
      _call('forward', y_shape, x, kernel, **attributes),
      _call('input_gradient', x_shape, dy, kernel, **attributes),
      _call('kernel_gradient', kernel_shape, x, dy, **attributes),
    )
    return ours, (y, *vjp(dy))

  try:
    ours, xla = jax.block_until_ready(jax.jit(both)(x, kernel, dy))
  except jax.errors.JaxRuntimeError as e:
    return str(e).splitlines()[0]
  for name, a, b in zip(('forward', 'input gradient', 'kernel gradient'), ours, xla):
    error = _relative_error(a, b)
    if not error < SELF_CHECK_TOLERANCE:
      return f"its {name} is off XLA's by {error:.1e} of the largest value"
  return None


def _self_check_sums(x_shape) -> str | None:
  """None when the one-pass sums of this per-device shape match numpy's; else how not."""
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal(x_shape, np.float32) for _ in range(2))
  center = rng.standard_normal(x_shape[-1], np.float32)
  got = jax.jit(lambda *v: _call('channel_sums', (2, x_shape[-1]), *v))(*_on_cpu(a, b, center))
  rows = (-1, x_shape[-1])
  a, b = a.reshape(rows).astype(np.float64), b.reshape(rows).astype(np.float64)
  want = np.stack([a.sum(0), (a * (b - center)).sum(0)])
  error = _relative_error(got, want)
  return None if error < SELF_CHECK_TOLERANCE else f'they are off by {error:.1e}'


def _output_shape(x_shape, kernel_shape, stride: int):
  n, h, w, _ = x_shape
  return (n, -(-h // stride), -(-w // stride), kernel_shape[3])  # SAME: ceil(size / stride)


def _attributes(x_shape, kernel_shape, stride: int, dilation: int, groups: int, checked=False):
  window = tuple((k - 1) * dilation + 1 for k in kernel_shape[:2])
  (top, bottom), (left, right) = jax.lax.padtype_to_pads(
    x_shape[1:3], window, (stride, stride), 'SAME'
  )
  values = dict(
    stride=stride, dilation=dilation, pad_top=top, pad_bottom=bottom, pad_left=left,
    pad_right=right, groups=groups, threads=_threads_per_call(),
  )  # fmt: skip
  fenced = checked or os.environ.get(SWITCH, '').lower() == 'checked'
  return {**{k: np.int64(v) for k, v in values.items()}, 'checked': fenced}


def _call(kind: str, shape, *operands, **attributes):
  result = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(TARGETS[kind], result)(*operands, **attributes)


def _per_device(fn, mesh, in_specs, out_specs):
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _summed_over_devices(partial, mesh):
  """A device's partial sum (inside ``_per_device``), summed over the mesh's devices."""
  return partial if mesh is None else jax.lax.psum(partial, parallel.DATA_AXIS)


_ROWS, _WHOLE = jax.sharding.PartitionSpec(parallel.DATA_AXIS), jax.sharding.PartitionSpec()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, stride, dilation, groups, mesh):
  def forward(x, kernel):
    shape = _output_shape(x.shape, kernel.shape, stride)
    return _call(
      'forward', shape, x, kernel, **_attributes(x.shape, kernel.shape, stride, dilation, groups)
    )

  return _per_device(forward, mesh, (_ROWS, _WHOLE), _ROWS)(x, kernel)


def _conv_forward(x, kernel, stride, dilation, groups, mesh):
  return _conv(x, kernel, stride, dilation, groups, mesh), (x, kernel)


def _conv_backward(stride, dilation, groups, mesh, residuals, dy):
  x, kernel = residuals
  attributes = _attributes(x.shape, kernel.shape, stride, dilation, groups)

  def input_gradient(dy, kernel, x):
    return _call('input_gradient', x.shape, dy, kernel, **attributes)

  def kernel_gradient(x, dy):
    return _summed_over_devices(_call('kernel_gradient', kernel.shape, x, dy, **attributes), mesh)

  dx = _per_device(input_gradient, mesh, (_ROWS, _WHOLE, _ROWS), _ROWS)(dy, kernel, x)
  dkernel = _per_device(kernel_gradient, mesh, (_ROWS, _ROWS), _WHOLE)(x, dy)
  return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int, groups: int, mesh):
  """SAME-padded NHWC x HWIO convolution through oneDNN, differentiable, split over ``mesh``
  (None: the caller is per device); only where ``handles_conv``."""
  if _as_handed(x.shape, kernel.shape, stride)[1] != stride:
    x, stride = x[:, ::stride, ::stride], 1
  return _conv(x, kernel, stride, dilation, groups, mesh)


def _channel_sums(a, b, center, mesh):
  """Per channel: sum(a) and sum(a * (b - center)) over every axis but the last, [2, C]."""

  def sums(a, b, center):
    return _summed_over_devices(_call('channel_sums', (2, center.shape[0]), a, b, center), mesh)

  return _per_device(sums, mesh, (_ROWS, _ROWS, _WHOLE), _WHOLE)(a, b, center)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, mesh):
  return _batch_norm_forward(x, scale, bias, epsilon, mesh)[0]


def _batch_norm_forward(x, scale, bias, epsilon, mesh):
  count = x.size // x.shape[-1]
  sums = _channel_sums(x, x, jnp.zeros_like(scale), mesh)
  mean = sums[0] / count
  var = jnp.maximum(0.0, sums[1] / count - mean * mean)  # flax's fast variance
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias  # flax's order: (x - mean) * (rsqrt * scale) + bias
  return (y, mean, var), (x, scale, mean, inv)


def _batch_norm_backward(epsilon, mesh, residuals, cotangents):
  x, scale, mean, inv = residuals
  dy, dmean, dvar = cotangents
  count = x.size // x.shape[-1]
  sums = _channel_sums(dy, x, mean, mesh)
  dbias = sums[0]
  dscale = sums[1] * inv  # sum(dy * (x - mean) / std)
  centered = x - mean
  dx = (scale * inv) * (dy - dbias / count - centered * (inv * inv * sums[1] / count))
  dx = dx + dmean / count + centered * (2 * dvar / count)  # through the returned statistics
  return dx, dscale, dbias


_batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)


def batch_norm(x, scale, bias, epsilon: float, mesh):
  """BatchNorm in training mode with the batch's statistics: ``(y, mean, var)`` as flax
  computes them (the fast variance), its sums over rows in one pass each, forward and
  backward, split over ``mesh`` as ``conv``; only where ``handles_batch_norm``."""
  return _batch_norm(x, scale, bias, epsilon, mesh)
