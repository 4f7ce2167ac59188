"""The headline commands rehearsed end to end at their real size (issue 29).

    python -m benchmarks.rehearsal [--networks=d121,r50] [--data_dir=DIR] [--quick]

For each network (``configs/imagenet_d121.py``, ``configs/imagenet_r50.py``), at full width
and resolution with only counts overridden (``COUNTS``: steps, batch, candidates, images):
  1. a synthetic ImageNet (``benchmarks/synthetic_imagenet.py``) in ``--data_dir``, written
     if it is not there, read through the real streamed reader;
  2. run A: the main job as 2 processes of 2 devices (``launch/local_processes.sh 2 2``),
     uninterrupted: train, checkpoint, rank, choose, export, report;
  3. run B: the same in another workdir, process 1 SIGKILLed once the first checkpoint is on
     disk (the launcher then takes process 0 down), and the same command again to the end;
     every result file (``RESULT_FILES``) must equal run A's byte for byte;
  4. in one process of 4 devices, the train step compiled at the config's own per-device
     batch (the paper's): compile time, XLA's cost analysis (FLOPs, bytes accessed), its
     memory analysis per device (arguments, outputs, temporaries) and its collectives; and
     the checkpoint of that state saved and restored (size, seconds).
From the runs: every program's compile time (``JAX_LOG_COMPILES``: every process logs each
compilation; the slowest process's is kept), each process's peak resident memory, the
checkpoint's size on disk, ranking seconds per candidate per 1,000 validation images and
the input pipeline's decoded, cropped images per second of one core. Prints the tables and
writes ``benchmarks/results/rehearsal.{md,json}`` (``--quick``: ``rehearsal_quick``).

``--quick`` runs the same procedure at a toy size (a small network of each family on 32x32
images) to check the script in minutes; its numbers mean nothing for a pod. Export latency
is not measured (``export.latency=False``: timing a full-size network at batch 128 on this
CPU would take longer than the rest); the compact export itself runs.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

from benchmarks import fingerprints, harness, synthetic_imagenet

ROOT = harness.ROOT
CONFIGS = {'d121': 'configs/imagenet_d121.py', 'r50': 'configs/imagenet_r50.py'}
RESULT_FILES = fingerprints.FILES + ('search/winner_compact.npz',)
COUNTS = {  # everything else is the config file's
  'train.num_steps': 6,
  'train.batch_size': 8,  # 2 images per device
  'train.log_every_steps': 1,
  'checkpoint.every_steps': 2,
  'data.validation_size': 200,
  'search.num_candidates': 8,
  'search.eval_batch_size': 40,
  'export.latency': False,
  'log.tensorboard': False,
}
QUICK = {  # a toy network of each family on 32x32 images: the procedure, not the numbers
  'data.image_size': 32,
  'model.densenet.blocks': (1, 1),
  'model.densenet.stem_width': 8,
  'model.densenet.growth_rate': 4,
  'model.densenet.bottleneck_width': 8,
  'model.resnet.blocks_per_stage': (1, 1),
  'model.resnet.stem_width': 8,
  'model.resnet.widths': (8, 16),
}
IMAGES = {'train': 400, 'validation': 100}  # of the synthetic ImageNet
COMPILED = re.compile(r'Finished XLA compilation of (.+?) in ([0-9.]+) sec')
PROCESSES = 2
# Compilation per process (docs/scaling.md, issue 29) at a first start on a machine that has
# compiled nothing; a restart loads what the killed start compiled and its table lists what it
# still compiles (what the killed start had not reached).
FIRST_START_COMPILE_TARGET_S = 400.0


def config_of(network: str, overrides: dict):
  """The network's config file with ``overrides`` (dotted keys) set."""
  from pgnas_jax import config as config_lib

  config = config_lib.read_config_file(os.path.join(ROOT, CONFIGS[network])).get_config()
  return config_lib.set_fields(config, overrides)


def _flag(key: str, value) -> str:
  text = value if isinstance(value, str) else str(value).replace(' ', '')
  return f'--config.{key}={text}'


def _command(network: str, workdir: str, overrides: dict) -> list:
  flags = [_flag(k, v) for k, v in overrides.items()]
  launcher = os.path.join(ROOT, 'launch', 'local_processes.sh')
  return [
    'bash',
    launcher,
    '2',
    '2',
    f'--workdir={workdir}',
    f'--config={CONFIGS[network]}',
  ] + flags


def _processes(launcher: psutil.Process) -> dict:
  """process_id -> psutil.Process of the main jobs the launcher started."""
  found = {}
  for child in launcher.children(recursive=True):
    try:
      ids = [a for a in child.cmdline() if a.startswith('--process_id=')]
    except psutil.Error:
      continue
    if ids:
      found[int(ids[0].split('=')[1])] = child
  return found


def _first_checkpoint(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def launch(
  network: str,
  workdir: str,
  overrides: dict,
  kill_at_checkpoint: bool = False,
  timeout_s: float = 3600.0,
) -> dict:
  """Runs the main job as 2 processes of 2 devices, its persistent compilation cache in
  ``<workdir>.xla`` and its other caches (the CPU kernels' library and self-check verdicts)
  in ``<workdir>.cache``, both empty at the first start as on a new machine; with
  ``kill_at_checkpoint``, SIGKILLs process 1 once the first checkpoint is on disk; a start
  still running after ``timeout_s`` (a hang) is killed whole and says so. Returns
  wall seconds, exit status, each process's peak resident MiB, every program's compile
  seconds (slowest process; a program loaded from the cache is not compiled) and all
  compilations' seconds and count per process (their sum over the processes, halved)."""
  log_path = os.path.join(workdir + '.log')
  env = {
    **os.environ,
    'JAX_LOG_COMPILES': '1',
    'PYTHONPATH': ROOT,
    'JAX_COMPILATION_CACHE_DIR': workdir + '.xla',
    'XDG_CACHE_HOME': workdir + '.cache',
  }
  start = time.perf_counter()
  offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0  # an earlier start's
  with open(log_path, 'a') as log:
    launcher = subprocess.Popen(
      _command(network, workdir, overrides), cwd=ROOT, env=env, stdout=log, stderr=log
    )
    peak, killed, timed_out = {}, False, False
    parent = psutil.Process(launcher.pid)
    while launcher.poll() is None:
      if time.perf_counter() - start > timeout_s:
        timed_out = True
        for proc in parent.children(recursive=True) + [parent]:
          try:
            proc.send_signal(signal.SIGKILL)
          except psutil.Error:
            pass
        launcher.wait()
        break
      for pid, proc in _processes(parent).items():
        try:
          peak[pid] = max(peak.get(pid, 0), proc.memory_info().rss)
        except psutil.Error:
          pass
      if kill_at_checkpoint and not killed and _first_checkpoint(workdir):
        victim = _processes(parent).get(1)
        if victim is not None:
          victim.send_signal(signal.SIGKILL)
          killed = True
      time.sleep(0.5)
  with open(log_path) as f:
    f.seek(offset)
    compiles, total, count = {}, 0.0, 0
    for name, seconds in COMPILED.findall(f.read()):
      compiles[name] = max(compiles.get(name, 0.0), float(seconds))
      total, count = total + float(seconds), count + 1
  return {
    'wall_s': time.perf_counter() - start,
    'status': launcher.returncode,
    'timed_out': timed_out,
    'killed': killed,
    'peak_rss_mib': {p: round(b / 2**20) for p, b in sorted(peak.items())},
    'compile_s': compiles,
    'compile_s_per_process': total / PROCESSES,
    'compilations_per_process': count / PROCESSES,
    'log': log_path,
  }


def differing_files(a: str, b: str) -> list:
  """The result files that are not byte for byte the same in workdirs ``a`` and ``b``."""
  out = []
  for name in RESULT_FILES:
    pa, pb = os.path.join(a, name), os.path.join(b, name)
    if not (os.path.exists(pa) and os.path.exists(pb)):
      out.append(f'{name} (missing)')
      continue
    with open(pa, 'rb') as fa, open(pb, 'rb') as fb:
      if fa.read() != fb.read():
        out.append(name)
  return out


def _folder_mib(path: str) -> float:
  total = 0
  for folder, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  return total / 2**20


def analyse_step(network: str, quick: bool) -> dict:
  """In a new process of 4 devices: the compiled train step at the config's per-device
  batch and its checkpoint (``--analyse``)."""
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    'JAX_PLATFORMS': 'cpu',
    'PYTHONPATH': ROOT,
  }
  args = [sys.executable, '-m', 'benchmarks.rehearsal', f'--analyse={network}']
  out = subprocess.run(
    args + (['--quick'] if quick else []), cwd=ROOT, env=env, capture_output=True, text=True
  )
  if out.returncode:
    raise RuntimeError(f'step analysis of {network} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')


def _analysis(network: str, quick: bool) -> dict:
  """The body of ``analyse_step``, run in the 4-device process: the config's own batch over
  4 devices (the paper's per-device batch: it trained on 4 GPUs)."""
  import jax

  from pgnas_jax import checkpoint as checkpoint_lib
  from pgnas_jax import parallel, supernets

  config = config_of(network, QUICK if quick else {})
  shape = (config.data.image_size, config.data.image_size, 3)
  mesh = harness.mesh_of(len(jax.devices()))
  model = supernets.build(config.model, 1000)
  state, _, step = harness.train_state(config, model, shape, mesh)
  data = harness.synthetic_batch(config.train.batch_size, shape, 1000)
  batch = parallel.put_batch({'images': data['images'], 'labels': data['labels']}, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost, memory = compiled.cost_analysis(), compiled.memory_analysis()
  text = compiled.as_text()
  with tempfile.TemporaryDirectory() as workdir:
    saver = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    start = time.perf_counter()
    saver.save(int(state.step), state)
    saver.wait()
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(saver.restore_latest(state))
    restore_s = time.perf_counter() - start
    size = _folder_mib(saver.directory)
    saver.close()
  return {
    'devices': len(jax.devices()),
    'per_device_batch': config.train.batch_size // len(jax.devices()),
    'compile_s': compile_s,
    'flops': float(cost.get('flops', 0.0)),
    'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
    'argument_mib': memory.argument_size_in_bytes / 2**20,
    'output_mib': memory.output_size_in_bytes / 2**20,
    'temp_mib': memory.temp_size_in_bytes / 2**20,
    'collectives': {c: len(re.findall(rf'= \S+ {c}(-start)?\(', text)) for c in COLLECTIVES},
    'checkpoint_mib': size,
    'checkpoint_save_s': save_s,
    'checkpoint_restore_s': restore_s,
  }


def _check(run: dict, what: str) -> None:
  if run['status'] or run['timed_out']:
    with open(run['log']) as f:
      tail = f.read()[-3000:]
    how = 'hung (killed after its time limit)' if run['timed_out'] else f'status {run["status"]}'
    raise RuntimeError(f'{what} failed: {how}; its log {run["log"]} ends:\n{tail}')


def rehearse(network: str, data_dir: str, quick: bool, scratch: str) -> dict:
  """One network: runs A and B, the step analysis; the table's row."""
  overrides = {**COUNTS, **(QUICK if quick else {}), 'data.data_dir': data_dir}
  a, b = os.path.join(scratch, f'{network}_a'), os.path.join(scratch, f'{network}_b')
  timeout_s = 600.0 if quick else 3600.0
  run_a = launch(network, a, overrides, timeout_s=timeout_s)
  _check(run_a, f'run A of {network}')
  first_b = launch(network, b, overrides, kill_at_checkpoint=True, timeout_s=timeout_s)
  rerun_b = launch(network, b, overrides, timeout_s=timeout_s)
  _check(rerun_b, f'the rerun of {network} after the kill')
  arch = json.load(open(os.path.join(a, 'search', 'arch.json')))
  timings = json.load(open(os.path.join(a, 'timings.json')))
  images = COUNTS['data.validation_size']
  return {
    'network': network,
    'run_a': run_a,
    'run_b_killed': first_b,
    'run_b_rerun': rerun_b,
    'identical_after_kill': not differing_files(a, b) and first_b['killed'],
    'differing': differing_files(a, b),
    'checkpoint_mib': _folder_mib(os.path.join(a, 'checkpoints')),
    'ranking_s_per_candidate_per_1000': timings['search']
    / COUNTS['search.num_candidates']
    / (images / 1000),
    'winner': {k: arch.get(k) for k in ('params', 'flops', 'compact_params', 'compact_flops')},
    'step': analyse_step(network, quick),
    'input': input_rate(network, data_dir, quick),
  }


def input_rate(network: str, data_dir: str, quick: bool, batches: int = 6) -> dict:
  """Decoded, cropped, flipped and normalised training images per second of the streamed
  reader on the synthetic ImageNet, all cores reading (as a run reads), and per core."""
  from pgnas_jax import data as data_lib

  overrides = {**(QUICK if quick else {}), 'data.data_dir': data_dir}
  config = config_of(network, {**overrides, 'data.validation_size': COUNTS['data.validation_size']})
  dataset = data_lib.load(config.data)
  dataset.train_batch(config.data, 0, 0, 64)  # warm-up: opens the files
  start = time.perf_counter()
  for step in range(1, batches + 1):
    dataset.train_batch(config.data, 0, step, 64)
  rate = 64 * batches / (time.perf_counter() - start)
  return {'images_per_s': rate, 'per_core': rate / os.cpu_count(), 'cores': os.cpu_count()}


def _compiles(compile_s: dict, at_least: float) -> str:
  slow = sorted(compile_s.items(), key=lambda kv: -kv[1])
  return '; '.join(f'{name} {seconds:.0f} s' for name, seconds in slow if seconds >= at_least)


def cpu_name() -> str:
  with open('/proc/cpuinfo') as f:
    names = re.findall(r'model name\s*:\s*(.+)', f.read())
  return f'{names[0] if names else "unknown CPU"}, {os.cpu_count()} cores'


def write(name: str, rows: list, note: str = '') -> str:
  """The two tables (runs; the step at the paper's batch) as markdown and the rows as JSON
  under ``benchmarks/results/``; returns the markdown."""
  runs = [
    {
      'network': r['network'],
      'run A s': r['run_a']['wall_s'],
      'peak RSS MiB (process 0, 1)': ', '.join(map(str, r['run_a']['peak_rss_mib'].values())),
      'killed at checkpoint, rerun = A': 'yes'
      if r['identical_after_kill']
      else f'NO {r["differing"]}',
      'rerun s': r['run_b_rerun']['wall_s'],
      f'compile s per process: first start (target {FIRST_START_COMPILE_TARGET_S:.0f}) / restart': (
        f'{r["run_a"]["compile_s_per_process"]:.0f} / '
        f'{r["run_b_rerun"]["compile_s_per_process"]:.0f}'
      ),
      'compilations per process: first start / restart': (
        f'{r["run_a"]["compilations_per_process"]:.0f} / '
        f'{r["run_b_rerun"]["compilations_per_process"]:.0f}'
      ),
      'compiles of 1 s or more (restart)': _compiles(r['run_b_rerun']['compile_s'], 1.0) or 'none',
      'checkpoint MiB': r['checkpoint_mib'],
      'ranking s / candidate / 1000 images': r['ranking_s_per_candidate_per_1000'],
      'input images/s per core': r['input']['per_core'],
      'compiles of 1 s or more (run A)': _compiles(r['run_a']['compile_s'], 1.0),
    }
    for r in rows
  ]
  steps = [
    {
      'network': r['network'],
      'per-device batch (4 devices)': r['step']['per_device_batch'],
      'compile s': r['step']['compile_s'],
      'GFLOP per device': r['step']['flops'] / 1e9,
      'GB accessed': r['step']['bytes_accessed'] / 1e9,
      'arguments MiB': r['step']['argument_mib'],
      'outputs MiB': r['step']['output_mib'],
      'temporaries MiB': r['step']['temp_mib'],
      'collectives': ', '.join(f'{k} {v}' for k, v in r['step']['collectives'].items() if v),
      'checkpoint MiB, save s, restore s': f'{r["step"]["checkpoint_mib"]:.1f}, '
      f'{r["step"]["checkpoint_save_s"]:.1f}, {r["step"]["checkpoint_restore_s"]:.1f}',
    }
    for r in rows
  ]
  counts = ', '.join(f'{k}={v}' for k, v in COUNTS.items())
  notes = f'{cpu_name()}; each run 2 processes of 2 simulated devices; counts: {counts}. {note}'
  text = harness.write_table(name, 'Rehearsal: 2 processes x 2 devices', list(runs[0]), runs, notes)
  text += harness.write_table(
    name + '_step',
    "The train step at the config's batch over 4 devices",
    list(steps[0]),
    steps,
    f'{cpu_name()}; one process of 4 simulated devices. {note}',
  )
  with open(os.path.join(harness.RESULTS, name + '_runs.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  return text


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.rehearsal')
  parser.add_argument('--networks', default='d121,r50')
  parser.add_argument(
    '--data_dir', default=os.path.join(tempfile.gettempdir(), 'synthetic_imagenet')
  )
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--note', default='', help='written under the tables: what ran beside')
  parser.add_argument('--analyse', help=argparse.SUPPRESS)  # the 4-device step analysis
  args = parser.parse_args(argv)
  if args.analyse:
    print(json.dumps(_analysis(args.analyse, args.quick)))
    return
  if not os.path.isdir(os.path.join(args.data_dir, synthetic_imagenet.NAME)):
    synthetic_imagenet.write(args.data_dir, IMAGES['train'], IMAGES['validation'])
  rows = []
  scratch = tempfile.mkdtemp(prefix='pgnas_rehearsal_')  # kept, with the logs, on a failure
  print(f'workdirs and logs in {scratch}', flush=True)
  for network in args.networks.split(','):
    rows.append(rehearse(network, args.data_dir, args.quick, scratch))
  write('rehearsal_quick' if args.quick else 'rehearsal', rows, args.note)
  shutil.rmtree(scratch)


if __name__ == '__main__':
  main()
