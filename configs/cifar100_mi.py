"""SupNet-MI (shake-shake 26 2x160d) on CIFAR-100 (supplement section 1.1; SPEC.md
section 6).

    python -m pgnas_jax.main --config=configs/cifar100_mi.py --workdir=/tmp/pgnas_cifar100_mi

Needs the `tfds` extra and CIFAR-100 prepared as array_record in tfds' default data_dir
(docs/data.md). Paper (Table 2, PGNAS-MI, 5000 candidates, no fine-tuning): 14.28% test
error, 46.4M params, 11 GPU-days on a single NVIDIA P40.
"""

from pgnas_jax import config as config_lib


def get_config():
  """SupNet-M's setup (configs/cifar10_m.py) on CIFAR-100 and the wider network, with a
  stronger prior and more candidates."""
  c = config_lib.read_sibling(__file__, 'cifar10_m').get_config()
  c.data.name = 'cifar100'
  c.model.shake_shake.widths = (160, 320, 640)
  c.objective.weight_prior_l2 = 2500.0
  c.search.num_candidates = 5000
  return c
