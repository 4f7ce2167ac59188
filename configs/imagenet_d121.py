"""SupNet-D-121 (DenseNet-121, 1x1 conv inputs searchable by source) on ImageNet, the paper's
setup (supplement section 1.2; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/imagenet_d121.py --workdir=/tmp/pgnas_imagenet_d121

Needs the `tfds` extra and ImageNet (ILSVRC 2012) prepared by hand as array_record in tfds'
default data_dir (docs/data.md); 50,000 training images are held out for ranking and
the official validation set is the test split. Paper (Table 8, PGNAS-D-121, no fine-tuning):
24.8% top-1 / 7.5% top-5 error, 6.6M params, 26 GPU-days, on 4 NVIDIA M40 GPUs.
"""

from pgnas_jax import config as config_lib

common = config_lib.read_sibling(__file__, 'common')


def get_config():
  c = common.imagenet()
  c.model.family = 'densenet'
  c.objective.weight_prior_l2 = 100.0
  c.train.batch_size = 300
  c.train.num_epochs = 180.0
  c.train.step_epochs = (90, 140, 160)
  return c
