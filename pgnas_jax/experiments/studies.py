"""What the studies (``replicate``, ``sampling``, ``targets``) share: their command line, the
workdir that holds one study's sizes, and how a report is written from ``results.json``."""

import dataclasses
import json
import os
import sys
from typing import NamedTuple
from collections.abc import Callable

from absl import app, flags, logging

from pgnas_jax import cli as cli_lib
from pgnas_jax import errors, parallel
from pgnas_jax import workdir as workdir_lib


def cli(module: str, run_study: Callable, full, quick, report: str, quick_help: str) -> None:
  """``python -m MODULE --workdir=DIR [--quick] [--data_dir=...]``: runs
  ``run_study(FULL or QUICK, workdir, data_dir, command)`` with one-line answers to bad
  input. ``report`` names the markdown file the study writes."""
  workdir = flags.DEFINE_string(
    'workdir', None, f'Directory for the study: every run, results.json, {report}, figures/.'
  )
  quick_flag = flags.DEFINE_bool('quick', False, quick_help)
  data_dir = flags.DEFINE_string(
    'data_dir', None, 'Folder of the Fashion-MNIST IDX files (default: the config default).'
  )
  flags.mark_flag_as_required('workdir')

  def run(argv):
    logging.get_absl_handler().addFilter(cli_lib.quiet_libraries)
    if len(argv) > 1:
      cli_lib.fail(f'unexpected arguments {argv[1:]}')
    cli_lib.exit_on_user_errors(
      run_study,
      quick if quick_flag.value else full,
      workdir.value,
      data_dir.value,
      ' '.join([f'python -m {module}'] + sys.argv[1:]),
    )

  app.run(run)


class Report(NamedTuple):
  """A study's report: the markdown file ``name`` (``markdown(results)``) and the figures
  (``{file name: plot(results, path)}``) it shows."""

  name: str
  markdown: Callable
  figures: dict

  def write(self, results: dict, workdir: str) -> str:
    """Writes the report and ``figures/`` under ``workdir``; returns the markdown path."""
    os.makedirs(os.path.join(workdir, 'figures'), exist_ok=True)
    for name, plot in self.figures.items():
      plot(results, os.path.join(workdir, 'figures', name))
    path = os.path.join(workdir, self.name)
    with open(path, 'w') as f:
      f.write(self.markdown(results))
    return path

  def rewrite(self, usage: str) -> None:
    """``python -m REPORT_MODULE DIR``: the report again from ``DIR/results.json``."""
    if len(sys.argv) != 2:
      sys.exit(usage)
    with open(os.path.join(sys.argv[1], 'results.json')) as f:
      print(self.write(json.load(f), sys.argv[1]))


def claim_workdir(study, workdir: str) -> None:
  """A study's workdir holds one study: its sizes are recorded at the start
  (``DIR/sizes.json``) and a run with other sizes is refused before anything runs."""
  path = os.path.join(workdir, 'sizes.json')
  sizes = json.loads(json.dumps(dataclasses.asdict(study)))
  if os.path.exists(path):
    before = workdir_lib.read_json(path)
    changed = sorted(k for k in set(before) | set(sizes) if before.get(k) != sizes.get(k))
    if changed:
      raise errors.IncompatibleWorkdirError(
        f'--workdir={workdir} holds a study of other sizes ({", ".join(changed)} differ: '
        f'one is --quick, the other is not); nothing was changed. Use another --workdir, '
        f'or the flags that started it'
      )
  elif parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_json(path, sizes)
