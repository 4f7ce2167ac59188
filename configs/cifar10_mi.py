"""SupNet-MI (shake-shake 26 2x160d) on CIFAR-10, the paper's main result (supplement section
1.1; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_mi.py --workdir=/tmp/pgnas_cifar10_mi

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(docs/data.md). Paper (Table 1, PGNAS-MI, 1500 candidates, no fine-tuning): 2.06% test
error, 33.4M params, 6.5 GPU-days on a single NVIDIA P40 (1.98% and 32.8M with 10000
candidates, `--config.search.num_candidates=10000`, 11.1 GPU-days).
"""

from pgnas_jax import config as config_lib


def get_config():
  """SupNet-M's setup (configs/cifar10_m.py) on the wider network, with a stronger prior."""
  c = config_lib.read_sibling(__file__, 'cifar10_m').get_config()
  c.model.shake_shake.widths = (160, 320, 640)
  c.objective.weight_prior_l2 = 150.0
  return c
