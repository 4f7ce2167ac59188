"""The CPU's convolutions through oneDNN: the train step's and a lone candidate's scoring.

XLA:CPU runs a convolution on Eigen (or YNNPACK), and the weight gradient only after
transposing its operands. oneDNN's convolutions, forward and both gradients, took a half to
two thirds of their time on one core for every conv of the default network (docs/
benchmarks.md, issue 17). ``cpu_convolution.cc`` wraps them as XLA FFI handlers; this module
builds it once per source and library version with the host's C++ compiler (a few seconds,
cached under ``~/.cache/pgnas_jax``), registers the handlers and offers ``conv``, a
``jax.custom_vjp`` over the three calls.

Where: only while a function is traced inside ``in_use(mesh)`` (``train.make_train_step`` and
``search.make_chunk_scorer``'s lone candidate), on a CPU mesh, for float32 convolutions
without feature groups. Everything else (accelerators, bfloat16, ENAS's depthwise convs, the
vmapped scorer, fine-tuning, the export) keeps XLA's convolutions. On a mesh of several
devices the calls run per device (``shard_map`` over the batch rows) and the kernel
gradient is summed across devices, as XLA's partitioned convolution does.

Numbers: oneDNN adds a convolution's products in another order than Eigen, so results
change by float32 rounding against XLA's convolutions; they are deterministic for a given
number of threads per call (one per device when the CPU is split into one device per core,
``host_devices``). Without oneDNN or a compiler (``PGNAS_JAX_CPU_CONVOLUTION=xla`` forces
that), the run keeps XLA's convolutions and says why once.
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import parallel

RUNTIME_PACKAGE = 'onednn-cpu-gomp'
HEADERS_PACKAGE = 'onednn-devel-cpu-gomp'
SWITCH = 'PGNAS_JAX_CPU_CONVOLUTION'  # 'xla': keep XLA's convolutions
SOURCE = pathlib.Path(__file__).with_suffix('.cc')
TARGETS = {
  'forward': 'pgnas_convolution_forward',
  'input_gradient': 'pgnas_convolution_input_gradient',
  'kernel_gradient': 'pgnas_convolution_kernel_gradient',
}
INSTALL_HINT = (
  f'pip install {RUNTIME_PACKAGE}==2023.2.0 {HEADERS_PACKAGE}==2023.2.0 (the project pins '
  'them on x86-64 Linux) and a C++ compiler (apt-get install g++)'
)

_state = threading.local()


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be built or loaded here; the message says why."""


def _package_file(package: str, suffix: str) -> pathlib.Path:
  try:
    files = importlib.metadata.distribution(package).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f'the package {package} is not installed') from None
  for f in files:
    if str(f).endswith(suffix):
      return pathlib.Path(f.locate()).resolve()
  raise Unavailable(f'the package {package} has no {suffix}')


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(root) / 'pgnas_jax'


def build() -> pathlib.Path:
  """The handlers' shared library, compiled on first use; raises ``Unavailable``."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise Unavailable('no C++ compiler (g++) on the PATH')
  header = _package_file(HEADERS_PACKAGE, '/oneapi/dnnl/dnnl.hpp')
  library = _package_file(RUNTIME_PACKAGE, '/libdnnl.so.3')
  include_dir, library_dir = header.parents[2], library.parent
  identity = hashlib.sha256(
    SOURCE.read_bytes() + f'{jax.__version__}|{library}|{include_dir}|{compiler}'.encode()
  ).hexdigest()[:16]
  target = _cache_dir() / f'cpu_convolution-{identity}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(f'.{os.getpid()}.partial')
  command = [
    compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
    f'-I{include_dir}', f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(partial),
    f'-L{library_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{library_dir}',
  ]  # fmt: skip
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    partial.unlink(missing_ok=True)
    raise Unavailable(f'compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}')
  os.replace(partial, target)  # atomic: processes building at once agree on the file
  return target


@functools.cache
def _loaded() -> str | None:
  """Registers the handlers once per process; None when they can be, else why not."""
  if os.environ.get(SWITCH, '').lower() == 'xla':
    return f'{SWITCH}=xla'
  try:
    library = ctypes.CDLL(str(build()))
  except (Unavailable, OSError) as e:
    logging.warning(
      "oneDNN's convolutions are unavailable (%s); this run keeps XLA's convolutions on "
      'the CPU, which train about 1.3x slower. To use them: %s.',
      e,
      INSTALL_HINT,
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


@contextlib.contextmanager
def in_use(mesh, per_device: bool = False):
  """While a function is traced in this context, ``layers``' float32 convolutions on a CPU
  ``mesh`` go to oneDNN. ``per_device``: the caller is already per device (inside a
  ``shard_map``); else the calls are split over the mesh's batch axis here."""
  use = mesh.devices.flat[0].platform == 'cpu' and available()
  previous = getattr(_state, 'setting', (False, None))
  _state.setting = (use, None if per_device or mesh.size == 1 else mesh)
  try:
    yield
  finally:
    _state.setting = previous


def applies(x: jax.Array, kernel: jax.Array, feature_groups: int) -> bool:
  """Whether ``layers`` hands this convolution to oneDNN."""
  return (
    getattr(_state, 'setting', (False, None))[0]
    and feature_groups == 1
    and x.dtype == jnp.float32
    and kernel.dtype == jnp.float32
  )


def _attributes(x_shape, kernel_shape, stride: int, dilation: int) -> dict:
  window = tuple((k - 1) * dilation + 1 for k in kernel_shape[:2])
  (top, bottom), (left, right) = jax.lax.padtype_to_pads(
    x_shape[1:3], window, (stride, stride), 'SAME'
  )
  values = dict(
    stride=stride, dilation=dilation, pad_top=top, pad_bottom=bottom, pad_left=left,
    pad_right=right, threads=_threads_per_call(),
  )  # fmt: skip
  return {k: np.int64(v) for k, v in values.items()}


def _call(kind: str, shape, *operands, **attributes):
  result = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(TARGETS[kind], result)(*operands, **attributes)


def _per_device(fn, mesh, in_specs, out_specs):
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


_ROWS, _WHOLE = jax.sharding.PartitionSpec(parallel.DATA_AXIS), jax.sharding.PartitionSpec()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, stride, dilation, mesh):
  def forward(x, kernel):
    n, h, w, _ = x.shape
    shape = (n, -(-h // stride), -(-w // stride), kernel.shape[3])  # SAME: ceil(size / stride)
    return _call(
      'forward', shape, x, kernel, **_attributes(x.shape, kernel.shape, stride, dilation)
    )

  return _per_device(forward, mesh, (_ROWS, _WHOLE), _ROWS)(x, kernel)


def _conv_forward(x, kernel, stride, dilation, mesh):
  return _conv(x, kernel, stride, dilation, mesh), (x, kernel)


def _conv_backward(stride, dilation, mesh, residuals, dy):
  x, kernel = residuals
  attributes = _attributes(x.shape, kernel.shape, stride, dilation)

  def input_gradient(dy, kernel, x):
    return _call('input_gradient', x.shape, dy, kernel, **attributes)

  def kernel_gradient(x, dy):
    partial = _call('kernel_gradient', kernel.shape, x, dy, **attributes)
    return partial if mesh is None else jax.lax.psum(partial, parallel.DATA_AXIS)

  dx = _per_device(input_gradient, mesh, (_ROWS, _WHOLE, _ROWS), _ROWS)(dy, kernel, x)
  dkernel = _per_device(kernel_gradient, mesh, (_ROWS, _ROWS), _WHOLE)(x, dy)
  return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def conv(x: jax.Array, kernel: jax.Array, stride: int, dilation: int) -> jax.Array:
  """SAME-padded NHWC x HWIO convolution through oneDNN, differentiable; only where
  ``applies``."""
  return _conv(x, kernel, stride, dilation, _state.setting[1])
