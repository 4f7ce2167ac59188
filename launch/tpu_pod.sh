#!/usr/bin/env bash
# Runs the main job on every host of a Cloud TPU VM pod slice (one process per host, all of
# its chips), joined through jax.distributed; JAX reads the coordinator, process count and
# index from the TPU VM's metadata (--distributed).
#   launch/tpu_pod.sh TPU_NAME ZONE --workdir=/mnt/shared/runs/NAME [--config=... --config.X=...]
# Every host needs this repository at $PGNAS_REPO (default ~/pgnas_jax) with the package and
# jax[tpu] installed, and the data dir and workdir at the same path on a filesystem every
# host mounts (README.md, "Running on several hosts").
set -euo pipefail
tpu="${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE --workdir=DIR [flags]}"
zone="${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE --workdir=DIR [flags]}"
shift 2
repo="${PGNAS_REPO:-~/pgnas_jax}"
args="$(printf ' %q' "$@")"
exec gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all \
  --command="cd ${repo} && python -m pgnas_jax.main --distributed${args}"
