"""What the studies (``replicate``, ``sampling``) share: their command line and how a report
is written from ``results.json``."""

import json
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from pgnas_jax import cli as cli_lib


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


def write_report(
  results: dict, workdir: str, report: str, markdown: Callable, figures: dict
) -> str:
  """Writes ``report`` (``markdown(results)``) and ``figures/`` (``{name: plot(results,
  path)}``) under ``workdir``; returns the markdown path."""
  os.makedirs(os.path.join(workdir, 'figures'), exist_ok=True)
  for name, plot in figures.items():
    plot(results, os.path.join(workdir, 'figures', name))
  path = os.path.join(workdir, report)
  with open(path, 'w') as f:
    f.write(markdown(results))
  return path


def rewrite_report(write: Callable, usage: str) -> None:
  """``python -m REPORT_MODULE DIR``: the report again from ``DIR/results.json``."""
  if len(sys.argv) != 2:
    sys.exit(usage)
  with open(os.path.join(sys.argv[1], 'results.json')) as f:
    print(write(json.load(f), sys.argv[1]))
