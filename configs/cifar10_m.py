"""SupNet-M (shake-shake 26 2x96d) on CIFAR-10, the paper's setup (supplement section 1.1;
SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_m.py --workdir=/tmp/pgnas_cifar10_m

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(README.md, "CIFAR"). Paper (Table 3, PGNAS on SupNet-M, no fine-tuning): 2.20% test error,
21.6M params; GPU-days not reported for this network; trained on a single NVIDIA P40.
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
  c.model.shake_shake.widths = (96, 192, 384)
  c.model.shake_shake.blocks_per_stage = 4
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.weight_prior_l2 = 50.0
  c.objective.num_train_effective = 5e5
  c.objective.weight_decay = 0.0
  c.train.batch_size = 128
  c.train.num_epochs = 1800.0
  c.train.learning_rate = 0.01
  c.train.schedule = 'cosine'
  c.search.num_candidates = 1500
  return c
