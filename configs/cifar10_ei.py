"""SupNet-EI (ENAS's CIFAR-10 micro network inflated to 72 filters) on CIFAR-10 (supplement
section 1.1; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_ei.py --workdir=/tmp/pgnas_cifar10_ei

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(README.md, "CIFAR"). Paper (Table 3, PGNAS on SupNet-EI, no fine-tuning): 2.56% test error,
10.8M params; GPU-days not reported for this network; trained on a single NVIDIA P40.
"""
from pgnas_jax import config as config_lib


def get_config():
  c = config_lib.get_config()
  c.data.name = 'cifar10'
  c.data.data_dir = ''  # tfds' default: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.validation_size = 5000
  c.data.pad_crop = 4
  c.data.random_flip = True
  c.data.cutout = 16
  c.model.family = 'enas'
  c.model.enas.filters = 72
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.weight_prior_l2 = 0.1
  c.objective.num_train_effective = 5e5
  c.objective.weight_decay = 0.0
  c.train.batch_size = 144
  c.train.num_epochs = 630.0  # SGDR cycles of 10+20+40+80+160+320 epochs
  c.train.learning_rate = 0.05
  c.train.schedule = 'sgdr'
  c.train.sgdr_min_lr = 1e-4
  c.train.sgdr_t0_epochs = 10.0
  c.train.sgdr_t_mul = 2.0
  c.search.num_candidates = 1500
  return c
