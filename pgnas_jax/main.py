"""The main job: config + workdir -> train the super-network -> rank candidates sampled from
the learned posterior -> export the winner -> report.

    python -m pgnas_jax.main --workdir=DIR [--config=configs/FILE.py] [--config.FIELD=VALUE]

Without --config it runs the embedded default (``pgnas_jax/config.py``).
"""

import os

import jax
from absl import app, flags, logging

from pgnas_jax import cli as cli_lib
from pgnas_jax import config as config_lib
from pgnas_jax import parallel, pipeline
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.backends.cpu import host_devices


def keep_compiled_programs() -> None:
  """JAX's persistent compilation cache in ``<cache_dir>/xla`` unless the user chose one
  (``JAX_COMPILATION_CACHE_DIR``): every process of every start compiles the same programs,
  minutes for the ImageNet networks (benchmarks/results/rehearsal.md); a restarted or resumed
  run, or the next run of the same network, loads them instead. A hit runs the very same
  executable."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir_lib.cache_dir(), 'xla'))


def no_cache_across_cpu_processes() -> None:
  """Turns the persistent compilation cache off in a run of several processes on CPUs
  (once they have joined, before anything compiles). Only process 0 writes cache entries,
  and on CPUs the other processes' programs do not hit them, so at a restart process 0
  loads its programs and the others compile theirs: SupNet-D-121's train step, 100 to
  180 s. XLA:CPU's cross-process collectives (gloo) give up when one process waits more
  than 30 s for the others to reach its first collective, and the restart hung (twice in
  two rehearsals, docs/scaling.md). Compiled alike, the processes reach it together."""
  if jax.process_count() > 1 and jax.devices()[0].platform == 'cpu':
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('persistent compilation cache off: several CPU processes (see main.py)')


def cli():
  """Defines the flags and runs the job."""
  config_flag = cli_lib.define_config_flag(os.path.join(os.path.dirname(__file__), 'config.py'))
  workdir_flag = flags.DEFINE_string('workdir', None, 'Directory for every output of the run.')
  start_over_flag = flags.DEFINE_bool(
    'start_over',
    False,
    'Delete the outputs of an earlier run in --workdir (checkpoints '
    'included) and start again; without it, a workdir holding a run is resumed.',
  )
  distributed_flag = flags.DEFINE_bool(
    'distributed',
    False,
    'Run as one of several processes (jax.distributed), reading the '
    'coordinator, process count and index from the cluster (Cloud TPU pod, SLURM); implied '
    'by --coordinator_address, --num_processes and --process_id, which give them instead.',
  )
  coordinator_flag = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, reachable by every process.'
  )
  num_processes_flag = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the run.'
  )
  process_id_flag = flags.DEFINE_integer(
    'process_id', None, 'Index of this process, 0 .. num_processes - 1.'
  )
  cpu_devices_flag = flags.DEFINE_string(
    'cpu_devices',
    host_devices.AUTO,
    'XLA devices to split the CPU of each process into: auto (one device per core without '
    'intra-op threads, fewer when the config does not split over them; one in multi-process '
    'runs) or a whole number. Accelerators are not affected.',
  )

  def job(config):
    config_lib.validate(config)  # bad input is answered before anything starts
    several = distributed_flag.value or num_processes_flag.value not in (None, 1)
    # before JAX starts its backends
    host_devices.split_for(cpu_devices_flag.value, config, several_processes=several)
    keep_compiled_programs()
    parallel.initialize_distributed(
      distributed_flag.value,
      coordinator_flag.value,
      num_processes_flag.value,
      process_id_flag.value,
    )
    if not parallel.is_main_process():  # one progress log for the run, process 0's
      logging.set_verbosity(logging.WARNING)
    no_cache_across_cpu_processes()
    pipeline.run(config, workdir_flag.value, start_over_flag.value)

  def main(argv):
    logging.get_absl_handler().addFilter(cli_lib.quiet_libraries)
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}')
    if not workdir_flag.value:
      raise app.UsageError('--workdir is required: the folder where the run writes its outputs')
    cli_lib.exit_on_user_errors(job, cli_lib.read_config(config_flag))

  app.run(main, flags_parser=cli_lib.parse_flags)


if __name__ == '__main__':
  cli()
