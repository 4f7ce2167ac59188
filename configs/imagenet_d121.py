"""SupNet-D-121 (DenseNet-121, 1x1 conv inputs searchable by source) on ImageNet, the paper's
setup (supplement section 1.2; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/imagenet_d121.py --workdir=/tmp/pgnas_imagenet_d121

Needs the `tfds` extra and ImageNet (ILSVRC 2012) prepared by hand as array_record in tfds'
default data_dir (README.md, "ImageNet"); 50,000 training images are held out for ranking and
the official validation set is the test split. Paper (Table 8, PGNAS-D-121, no fine-tuning):
24.8% top-1 / 7.5% top-5 error, 6.6M params, 26 GPU-days, on 4 NVIDIA M40 GPUs.
"""
from pgnas_jax import config as config_lib


def get_config():
  c = config_lib.get_config()
  c.data.name = 'imagenet2012'
  c.data.data_dir = ''  # tfds' default: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  c.data.validation_size = 50000
  c.data.image_size = 224
  c.data.random_flip = True
  c.data.pad_crop = 0
  c.data.cutout = 0
  c.model.family = 'densenet'
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.weight_prior_l2 = 100.0
  c.objective.num_train_effective = 1.2e6
  c.objective.weight_decay = 0.0
  c.train.batch_size = 300
  c.train.num_epochs = 180.0
  c.train.learning_rate = 0.1
  c.train.schedule = 'step'
  c.train.step_epochs = (90, 140, 160)
  c.train.step_factor = 10.0
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.search.num_candidates = 1500
  return c
