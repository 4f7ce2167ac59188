"""SupNet-R-50 (ResNet-50 with every 3x3 conv replaced by four kernel branches) on ImageNet,
the paper's setup (supplement section 1.2; SPEC.md section 6).

    python -m pgnas_jax.main --config=configs/imagenet_r50.py --workdir=/tmp/pgnas_imagenet_r50

Needs the `tfds` extra and ImageNet (ILSVRC 2012) prepared by hand as array_record in tfds'
default data_dir (README.md, "ImageNet"); 50,000 training images are held out for ranking and
the official validation set is the test split. Paper (Table 9, PGNAS-R-50, no fine-tuning):
22.73% top-1 error, 26.0M params; GPU-days not reported; trained on 4 NVIDIA M40 GPUs.
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
  c.model.family = 'resnet'
  c.drop.tau = 0.2
  c.drop.init_p = 0.1
  c.objective.weight_prior_l2 = 80.0
  c.objective.num_train_effective = 1.2e6
  c.objective.weight_decay = 0.0
  c.train.batch_size = 256
  c.train.num_epochs = 90.0
  c.train.learning_rate = 0.1
  c.train.schedule = 'step'
  c.train.step_epochs = (30, 60)  # lr / 10 every 30 epochs
  c.train.step_factor = 10.0
  c.train.momentum = 0.9
  c.train.nesterov = True
  c.search.num_candidates = 1500
  return c
