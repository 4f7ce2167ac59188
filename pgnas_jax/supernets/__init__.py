"""Super-networks by name. Each is a flax.linen module ``model.apply(variables, images,
train=...)`` whose searchable convs read masks from the ``masks`` collection."""
import ml_collections

from pgnas_jax.supernets.shake_shake import ShakeShakeNet

FAMILIES = ('shake_shake',)


def build(model_config: ml_collections.ConfigDict, num_classes: int):
  if model_config.family == 'shake_shake':
    return ShakeShakeNet(num_classes=num_classes, stem_width=model_config.stem_width,
                         widths=tuple(model_config.widths),
                         blocks_per_stage=model_config.blocks_per_stage,
                         kernel_sizes=tuple(model_config.kernel_sizes),
                         shake=model_config.shake)
  raise ValueError(f'unknown model.family {model_config.family!r}; choose one of {FAMILIES}')
