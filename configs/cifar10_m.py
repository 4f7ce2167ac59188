"""SupNet-M (shake-shake 26 2x96d) on CIFAR-10, the paper's setup (supplement section 1.1;
SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/cifar10_m.py --workdir=/tmp/pgnas_cifar10_m

Needs the `tfds` extra and CIFAR-10 prepared as array_record in tfds' default data_dir
(docs/data.md). Paper (Table 3, PGNAS on SupNet-M, no fine-tuning): 2.20% test error,
21.6M params; GPU-days not reported for this network; trained on a single NVIDIA P40.
"""

from pgnas_jax import config as config_lib

common = config_lib.read_sibling(__file__, 'common')


def get_config():
  c = common.cifar('cifar10')
  c.model.family = 'shake_shake'
  c.model.shake_shake.stem_width = 16
  c.model.shake_shake.widths = (96, 192, 384)
  c.model.shake_shake.blocks_per_stage = 4
  c.objective.weight_prior_l2 = 50.0
  c.train.batch_size = 128
  c.train.num_epochs = 1800.0
  c.train.learning_rate = 0.01
  c.train.schedule = 'cosine'
  return c
