"""The run context: what every stage of the main job needs, built once by the pipeline and
handed to each stage instead of a list of arguments."""

import dataclasses
from typing import Any

import jax
import ml_collections

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class Context:
  """One run of the main job in ``workdir``. ``writes``: whether this process writes the
  run's files (process 0; every process computes)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  dataset: data_lib.Source
  model: Any  # the super-network: a flax.linen module
  checkpointer: checkpoint_lib.Checkpointer
  guard: checkpoint_lib.PreemptionGuard
  writes: bool
  latency: Any = None  # latency_table.Table: the run's, when it predicts latency
