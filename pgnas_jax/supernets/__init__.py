"""Super-networks by family. Each is a flax.linen module ``model.apply(variables, images,
train=...)`` whose searchable convs read masks from the ``masks`` collection; its fields come
from the config's ``model.<family>`` sub-config; ``custom`` is the user's own module
(``supernets/custom.py``)."""

import ml_collections

from pgnas_jax.supernets import custom
from pgnas_jax.supernets.densenet import SearchableDenseNet
from pgnas_jax.supernets.enas import EnasNet
from pgnas_jax.supernets.resnet import MultiKernelResNet
from pgnas_jax.supernets.shake_shake import ShakeShakeNet

_BUILDERS = {
  'shake_shake': lambda c, n: ShakeShakeNet(
    num_classes=n,
    stem_width=c.stem_width,
    widths=tuple(c.widths),
    blocks_per_stage=c.blocks_per_stage,
    kernel_sizes=tuple(c.kernel_sizes),
    shake=c.shake,
  ),
  'enas': lambda c, n: EnasNet(
    num_classes=n,
    filters=c.filters,
    normal_cells_per_stage=c.normal_cells_per_stage,
    normal_arc=tuple(c.normal_arc),
    reduction_arc=tuple(c.reduction_arc),
    auxiliary_head=c.auxiliary_head,
  ),
  'resnet': lambda c, n: MultiKernelResNet(
    num_classes=n,
    stem_width=c.stem_width,
    widths=tuple(c.widths),
    blocks_per_stage=tuple(c.blocks_per_stage),
    kernel_sizes=tuple(c.kernel_sizes),
    dilations=tuple(c.dilations),
  ),
  'densenet': lambda c, n: SearchableDenseNet(
    num_classes=n,
    stem_width=c.stem_width,
    blocks=tuple(c.blocks),
    growth_rate=c.growth_rate,
    bottleneck_width=c.bottleneck_width,
    compression=c.compression,
  ),
  'custom': custom.build,
}
FAMILIES = tuple(_BUILDERS)


def build(model_config: ml_collections.ConfigDict, num_classes: int):
  if model_config.family not in _BUILDERS:
    raise ValueError(f'unknown model.family {model_config.family!r}; choose one of {FAMILIES}')
  return _BUILDERS[model_config.family](model_config[model_config.family], num_classes)
