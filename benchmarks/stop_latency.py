"""How fast a stop request is obeyed, in every phase of a run, and that no work is lost.

    python benchmarks/stop_latency.py [--points 12] [--signal SIGTERM] [--name stop_latency]

runs the main job once uninterrupted at a tiny size (the shape of issue 32's fault cases,
with fine-tuning), then once per point: a fresh run sent the signal at that many seconds,
spread evenly over the uninterrupted run's length, so every phase is hit, those without a
safe point (compiling, exporting) included. For each it records the seconds from the signal
to the end of the process, the exit status and last line, then reruns the same command to
the end and compares the SHA-256 of what the run writes with the uninterrupted run's.
Prints the table and writes ``benchmarks/results/<--name>.md`` and ``.json``.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
TINY = (
  '--config.model.shake_shake.stem_width=4',
  '--config.model.shake_shake.widths=(4,8)',
  '--config.train.num_steps=16',
  '--config.checkpoint.every_steps=4',
  '--config.data.validation_size=500',
  '--config.search.num_candidates=12',
  '--config.search.chunk_size=2',
  '--config.search.eval_batch_size=250',
  '--config.export.latency=False',
  '--config.finetune.steps=20',
)
COMPARED = (
  'posterior.json',
  'search/candidates.jsonl',
  'search/arch.json',
  'search/winner_weights.msgpack',
  'search/winner_finetuned_weights.msgpack',
  'search/winner_compact.npz',
  'search/winner_compact.stablehlo',
)


class _Run:
  """The main job in a new process, its stderr lines timed from its start."""

  def __init__(self, workdir: str):
    self.start = time.time()
    self.process = subprocess.Popen(
      [sys.executable, '-m', 'pgnas_jax.main', f'--workdir={workdir}', *TINY],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.lines = []  # (seconds since start, line)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append((time.time() - self.start, line.rstrip()))

  def finish(self) -> tuple[int, float]:
    """(exit status, seconds since start) once it has ended."""
    status = self.process.wait()
    ended = time.time() - self.start
    self._reader.join()
    return status, ended

  def last_progress_before(self, seconds: float) -> str:
    """The last progress line (absl INFO) logged before ``seconds``: the phase it was in."""
    seen = [line for t, line in self.lines if t <= seconds and line[:1] == 'I' and '] ' in line]
    return seen[-1].split('] ', 1)[1][:60] if seen else '(starting: no progress line yet)'


def _hashes(workdir: str) -> dict:
  out = {}
  for name in COMPARED:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        out[name] = hashlib.sha256(f.read()).hexdigest()[:16]
  return out


def _stopped(scratch: str, at: float, signum: int) -> dict:
  workdir = os.path.join(scratch, f'stop_{at:.0f}')
  run = _Run(workdir)
  time.sleep(max(0.0, at - (time.time() - run.start)))
  sent = time.time() - run.start
  if run.process.poll() is not None:
    return None  # it finished sooner than the uninterrupted run: nothing to stop
  run.process.send_signal(signum)
  status, ended = run.finish()
  last = run.lines[-1][1] if run.lines else ''
  rerun = _Run(workdir)
  rerun_status, _ = rerun.finish()
  return {
    'signal_at_s': round(sent, 1),
    'phase': run.last_progress_before(sent),
    'exit_after_s': round(ended - sent, 2),
    'status': status,
    'last_line': last[:140],
    'rerun_status': rerun_status,
    'hashes': _hashes(workdir),
  }


def _cpu() -> str:
  """The CPU's model name (timings differ by CPU: docs/benchmarks.md)."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _table(reference: dict, rows: list, signal_name: str) -> str:
  lines = [
    f'Stop requests ({signal_name}) at points spread over a tiny run with fine-tuning; '
    f'{_cpu()}, {os.cpu_count()} cores, '
    f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. Uninterrupted run: '
    f'{reference["seconds"]:.0f} s.',
    '',
    '| signal at (s) | phase (last progress line before it) | exit after (s) | status | '
    'rerun: same files as uninterrupted |',
    '|---:|---|---:|---:|---|',
  ]
  for row in rows:
    same = row['hashes'] == reference['hashes'] and row['rerun_status'] == 0
    lines.append(
      f'| {row["signal_at_s"]:.1f} | {row["phase"]} | {row["exit_after_s"]:.2f} | '
      f'{row["status"]} | {"yes" if same else "NO"} |'
    )
  slowest = max(rows, key=lambda r: r['exit_after_s'])
  lines += [
    '',
    f'Slowest: {slowest["exit_after_s"]:.2f} s (signal at {slowest["signal_at_s"]:.1f} s). '
    f'Its last line: `{slowest["last_line"]}`',
  ]
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--points', type=int, default=12)
  parser.add_argument('--signal', default='SIGTERM', choices=('SIGTERM', 'SIGINT'))
  parser.add_argument('--name', default='stop_latency')
  args = parser.parse_args()
  signum = getattr(signal, args.signal)
  scratch = tempfile.mkdtemp(prefix='pgnas_jax_stop_')
  try:
    whole = os.path.join(scratch, 'whole')
    run = _Run(whole)
    status, seconds = run.finish()
    if status != 0:
      sys.exit(f'the uninterrupted run failed ({status}): {run.lines[-1][1] if run.lines else ""}')
    reference = {'seconds': seconds, 'hashes': _hashes(whole)}
    print(f'uninterrupted: {seconds:.0f} s, files {sorted(reference["hashes"])}', flush=True)
    rows = []
    for i in range(args.points):  # the last point a few seconds before the end
      at = 2.0 + (seconds - 6.0) * i / max(1, args.points - 1)
      row = _stopped(scratch, at, signum)
      if row is not None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != 'hashes'}), flush=True)
    table = _table(reference, rows, args.signal)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.name + '.md'), 'w') as f:
      f.write(table)
    with open(os.path.join(RESULTS, args.name + '.json'), 'w') as f:
      json.dump({'reference': reference, 'rows': rows}, f, indent=1)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
