"""SupNet-EI (ENAS's CIFAR-10 micro network inflated to 72 filters) on CIFAR-10 (supplement
section 1.1; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_ei.py --workdir=/tmp/pgnas_cifar10_ei

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(docs/data.md). Paper (Table 3, PGNAS on SupNet-EI, no fine-tuning): 2.56% test error,
10.8M params; GPU-days not reported for this network; trained on a single NVIDIA P40.
"""

from pgnas_jax import config as config_lib


def get_config():
  """SupNet-E's setup (configs/cifar10_e.py) on the network of twice the filters."""
  c = config_lib.read_sibling(__file__, 'cifar10_e').get_config()
  c.model.enas.filters = 72
  return c
