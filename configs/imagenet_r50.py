"""SupNet-R-50 (ResNet-50 with every 3x3 conv replaced by four kernel branches) on ImageNet,
the paper's setup (supplement section 1.2; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/imagenet_r50.py --workdir=/tmp/pgnas_imagenet_r50

Needs the `tfds` extra and ImageNet (ILSVRC 2012) prepared by hand as array_record in tfds'
default data_dir (docs/data.md); 50,000 training images are held out for ranking and
the official validation set is the test split. Paper (Table 9, PGNAS-R-50, no fine-tuning):
22.73% top-1 error, 26.0M params; GPU-days not reported; trained on 4 NVIDIA M40 GPUs.
"""

from pgnas_jax import config as config_lib

common = config_lib.read_sibling(__file__, 'common')


def get_config():
  c = common.imagenet()
  c.model.family = 'resnet'
  c.objective.weight_prior_l2 = 80.0
  c.train.batch_size = 256
  c.train.num_epochs = 90.0
  c.train.step_epochs = (30, 60)  # lr / 10 every 30 epochs
  return c
