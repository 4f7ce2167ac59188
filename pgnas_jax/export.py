"""Export of a searched architecture (SPEC section 4): kept input channels per group, the
convolutions removed because every input was dropped, params and FLOPs, and the pruned
weights, which give the same logits as the masked super-network."""

from typing import Any

import flax.serialization
import jax
import numpy as np
from flax import traverse_util

from pgnas_jax import layers
from pgnas_jax import masks
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib

PyTree = Any


def kept_channels(mask: PyTree) -> PyTree:
  """Per group, the indices of kept input channels (int32)."""
  return jax.tree.map(lambda m: np.flatnonzero(np.asarray(m)).astype(np.int32), mask)


def removed_convs(mask: PyTree) -> list:
  """'/'-joined names of searchable convs whose every input channel is dropped."""
  flat = traverse_util.flatten_dict(jax.device_get(mask))
  return sorted(
    '/'.join(conv)
    for conv, groups in layers.groups_by_conv(mask).items()
    if sum(np.asarray(flat[g]).sum() for g in groups) == 0
  )


def pruned_variables(variables: dict, space: space_lib.SearchSpace, mask: PyTree) -> dict:
  """Variables of the pruned network: apply them to the same model, no masks needed."""
  kept = kept_channels(mask)
  return {
    'params': layers.prune_params(variables['params'], space.template, kept),
    'batch_stats': variables['batch_stats'],
    layers.ARCHITECTURE: kept,
  }


def describe(space: space_lib.SearchSpace, mask: PyTree, pruned: dict) -> dict:
  """The architecture as JSON-ready data; params are counted on the pruned weights."""
  names = space_lib.group_names(space)
  kept = [np.asarray(k).tolist() for k in jax.tree.leaves(kept_channels(mask))]
  params, macs = space_lib.costs(space, mask)
  counted = space_lib.count_params(pruned['params'])
  if counted != int(params):
    raise AssertionError(f'pruned weights hold {counted} params, the cost model says {params}')
  sizes = masks.channel_counts(space.template)
  dropped_channels = sum(s - len(k) for s, k in zip(sizes, kept))
  num_convs = len(layers.groups_by_conv(space.template))
  removed = removed_convs(mask)
  return {
    'kept_channels': dict(zip(names, kept)),
    'removed_convs': removed,
    'params': int(params),
    'flops': int(macs),
    'dropped_channel_share': dropped_channels / sum(sizes),
    'removed_conv_share': len(removed) / num_convs,
  }


def save_weights(path: str, pruned: dict) -> None:
  """Written atomically: a kill never leaves half a file."""
  workdir_lib.write_atomically(path, flax.serialization.msgpack_serialize(jax.device_get(pruned)))


def load_weights(path: str) -> dict:
  """The pruned network's variables, ready for ``model.apply(variables, images)``."""
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def main(argv=None) -> None:
  """``python -m pgnas_jax.export --workdir=DIR [--candidate=N]``: the compact network of
  any candidate of a finished run (default: the winner), without training or ranking again
  (``compact/candidate.py``)."""
  import argparse
  import json

  from pgnas_jax import cli as cli_lib
  from pgnas_jax.backends.cpu import host_devices
  from pgnas_jax.compact import candidate

  parser = argparse.ArgumentParser(prog='python -m pgnas_jax.export', description=main.__doc__)
  parser.add_argument('--workdir', required=True, help='folder of a finished run')
  parser.add_argument(
    '--candidate',
    type=int,
    default=None,
    help='index in search/candidates.jsonl (default: the winner)',
  )
  parser.add_argument(
    '--latency',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='measure the latency of the compact, masked and full networks',
  )
  parser.add_argument(
    '--cpu_devices',
    default=host_devices.AUTO,
    help="XLA devices to split the CPU into, as the main job's flag (default auto: as the "
    'run itself was split, so that latencies measured here and by the run compare)',
  )
  args = parser.parse_args(argv)

  def export_candidate():
    host_devices.split_for(args.cpu_devices, candidate.finished_config(args.workdir))
    return candidate.from_workdir(args.workdir, args.candidate, args.latency)

  described = cli_lib.exit_on_user_errors(export_candidate)
  print(json.dumps({k: v for k, v in described.items() if k != 'latency_ms'}))


if __name__ == '__main__':
  main()
