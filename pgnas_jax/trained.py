"""A trained run: the super-network, its trained state and search space, and what follows
from them (the learned posterior, any candidate's mask); ``restore`` brings back the one a
workdir holds, for the export command and the studies."""

from typing import Any, NamedTuple

import jax
import ml_collections

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, parallel, report, samplers, search, supernets, train
from pgnas_jax import masks as masks_lib
from pgnas_jax import space as space_lib
from pgnas_jax.supernets import custom


class Trained(NamedTuple):
  model: Any  # the super-network module
  state: train.TrainState
  space: space_lib.SearchSpace

  def posterior(self) -> list:
    """``posterior.json``'s table: every searchable group's learned drop probability."""
    p = jax.device_get(masks_lib.drop_probabilities(self.state.drop_logits))
    return report.posterior_table(
      space_lib.group_names(self.space),
      masks_lib.channel_counts(self.space.template),
      [float(x) for x in jax.tree.leaves(p)],
    )

  def mask(self, index: int, sampler: samplers.Sampler = samplers.IID):
    """The hard mask of candidate ``index``, as the search drew it."""
    state = self.state
    return search.candidate_mask(
      state.key('search'), index, state.drop_logits, self.space.template, sampler
    )


def restore(
  workdir: str,
  config: ml_collections.ConfigDict,
  dataset: data_lib.Source | None = None,
  mesh=None,
) -> Trained:
  """The run in ``workdir`` (trained with ``config``; its data set ``dataset``, loaded when
  None), restored from its newest readable checkpoint onto ``mesh`` (default: every device);
  one that has not finished training is refused in one line."""
  config_lib.validate(config)
  dataset = data_lib.load(config.data) if dataset is None else dataset
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = supernets.build(config.model, dataset.num_classes)
  if config.model.family == supernets.CUSTOM:  # the code the run trained, or a refusal
    custom.check_source(workdir, custom.source(model))
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  try:
    state, space = train.resume(model, config, dataset, mesh, checkpointer)
  finally:
    checkpointer.close()
  total = train.setup(config, dataset).total_steps
  if int(state.step) < total:
    raise errors.WorkdirError(
      f'{workdir} holds no trained super-network (its newest readable checkpoint is at step '
      f'{int(state.step)} of {total}): run python -m pgnas_jax.main --workdir={workdir} with '
      f'its config to finish it first'
    )
  return Trained(model, state, space)
