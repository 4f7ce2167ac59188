#!/usr/bin/env bash
# Runs the main job on this machine, data-parallel over N simulated CPU devices (default 1).
# The data-parallel code path is the one used on GPUs/TPUs; on a CPU it is a correctness
# check, not a speed-up.  Usage: launch/local.sh N --workdir=DIR [--config=... --config.X=...]
set -euo pipefail
n="${1:-1}"; shift || true
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${n}"
exec python -m pgnas_jax.main "$@"
