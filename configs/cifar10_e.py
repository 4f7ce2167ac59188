"""SupNet-E (ENAS's CIFAR-10 micro network, 36 filters) on CIFAR-10 (supplement section 1.1;
SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_e.py --workdir=/tmp/pgnas_cifar10_e

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(docs/data.md). Paper (Table 3, PGNAS on SupNet-E, no fine-tuning): 2.73% test error,
3.1M params; GPU-days not reported for this network; trained on a single NVIDIA P40.
"""

from pgnas_jax import config as config_lib

common = config_lib.read_sibling(__file__, 'common')


def get_config():
  c = common.cifar('cifar10')
  c.model.family = 'enas'
  c.model.enas.filters = 36
  c.objective.weight_prior_l2 = 0.1
  c.train.batch_size = 144
  c.train.num_epochs = 630.0  # SGDR cycles of 10+20+40+80+160+320 epochs
  c.train.learning_rate = 0.05
  c.train.schedule = 'sgdr'
  c.train.sgdr_min_lr = 1e-4
  c.train.sgdr_t0_epochs = 10.0
  c.train.sgdr_t_mul = 2.0
  return c
