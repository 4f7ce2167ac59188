#!/usr/bin/env bash
# Runs the main job as P processes on this machine, joined through jax.distributed on a free
# localhost port, each process with D simulated CPU devices (default 1): the multi-host code
# path (per-process batch rows, cross-process collectives over gloo, process 0 writing the
# workdir), checked on one machine. What the invariance test runs.
#   launch/local_processes.sh P [D] --workdir=DIR [--config=... --config.X=...]
# The first process to fail takes the others down (SIGKILL) and its exit status is the
# script's; SIGTERM or SIGINT is passed on to every process (they save and stop, status 143).
set -uo pipefail
num_processes="${1:?usage: launch/local_processes.sh P [D] --workdir=DIR [flags]}"; shift
devices=1
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then devices="$1"; shift; fi
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

declare -A running=()
trap 'kill -TERM "${!running[@]}" 2>/dev/null' TERM INT
trap 'kill -KILL "${!running[@]}" 2>/dev/null' EXIT
for ((i = 0; i < num_processes; i++)); do
  python -m pgnas_jax.main --coordinator_address="127.0.0.1:${port}" \
    --num_processes="${num_processes}" --process_id="${i}" "$@" &
  running[$!]=1
done
status=0
while ((${#running[@]})); do
  finished=''
  wait -n -p finished "${!running[@]}"
  code=$?
  [[ -z "${finished:-}" ]] && continue  # woken by a signal, already passed on
  unset "running[${finished}]"
  if ((code != 0 && status == 0)); then
    status="${code}"
    kill -KILL "${!running[@]}" 2>/dev/null
  fi
done
exit "${status}"
