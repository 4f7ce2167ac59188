"""SupNet-MI (shake-shake 26 2x160d) on CIFAR-10, the paper's main result (supplement section
1.1; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_mi.py --workdir=/tmp/pgnas_cifar10_mi

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(README.md, "CIFAR"). Paper (Table 1, PGNAS-MI, 1500 candidates, no fine-tuning): 2.06% test
error, 33.4M params, 6.5 GPU-days on a single NVIDIA P40 (1.98% and 32.8M with 10000
candidates, `--config.search.num_candidates=10000`, 11.1 GPU-days).
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
  c.model.family = 'shake_shake'
  c.model.shake_shake.stem_width = 16
  c.model.shake_shake.widths = (160, 320, 640)
  c.model.shake_shake.blocks_per_stage = 4
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.weight_prior_l2 = 150.0
  c.objective.num_train_effective = 5e5
  c.objective.weight_decay = 0.0
  c.train.batch_size = 128
  c.train.num_epochs = 1800.0
  c.train.learning_rate = 0.01
  c.train.schedule = 'cosine'
  c.search.num_candidates = 1500
  return c
