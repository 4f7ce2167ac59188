"""XLA compiler options that the project's jitted steps use on the CPU backend only.

XLA:CPU (jaxlib 0.10.2) hands convolutions to YNNPACK. For the weight gradient of a conv
(a convolution whose window is the whole image) YNNPACK is several times slower than XLA's
own Eigen convolution: on the default network the four 16->16 weight gradients on 28x28 took
45-48% of the train step (docs/benchmarks.md, issue 17). With no YNN fusion types
every convolution of the program runs on Eigen; training ran 1.5 to 2.3 times faster on the
default and m32 networks (ranking, forward only, gained nothing beyond noise and keeps the
defaults). Accelerators compile without these options. Where ``kernels`` runs the
step's convolutions on oneDNN, the options still keep YNNPACK off its elementwise fusions
(measured 1.5x slower with them) and apply wherever the kernels are unavailable.
"""

import jax

# An option of XLA's DebugOptions: the YNN fusion types to use, here none.
CPU_TRAIN_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def train_compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
  """Options for a jitted train step on ``mesh``: ``CPU_TRAIN_OPTIONS`` on CPU, else none."""
  if mesh.devices.flat[0].platform == 'cpu':
    return dict(CPU_TRAIN_OPTIONS)
  return None
