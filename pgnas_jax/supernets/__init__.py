"""Super-networks by family. Each is a flax.linen module ``model.apply(variables, images,
train=...)`` whose searchable convs read masks from the ``masks`` collection; its fields come
from the config's ``model.<family>`` sub-config."""
import ml_collections

from pgnas_jax.supernets.shake_shake import ShakeShakeNet

FAMILIES = ('shake_shake',)


def build(model_config: ml_collections.ConfigDict, num_classes: int):
  if model_config.family == 'shake_shake':
    c = model_config.shake_shake
    return ShakeShakeNet(num_classes=num_classes, stem_width=c.stem_width,
                         widths=tuple(c.widths), blocks_per_stage=c.blocks_per_stage,
                         kernel_sizes=tuple(c.kernel_sizes), shake=c.shake)
  raise ValueError(f'unknown model.family {model_config.family!r}; choose one of {FAMILIES}')
