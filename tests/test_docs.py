"""The documentation: an entry-page README, links that resolve, a config page that matches the
config schema."""

import ast
import glob
import os
import re

import pytest

from pgnas_jax import config_doc

ROOT = os.path.join(os.path.dirname(__file__), '..')
PAGES = sorted([os.path.join(ROOT, 'README.md')] + glob.glob(os.path.join(ROOT, 'docs', '*.md')))
SET_UP_COMMANDS = (
  (
    'apt-get update && apt-get install -y dataset-fashion-mnist g++ && pip install -e . && '
    'python -m pgnas_jax.main --workdir=/tmp/pgnas_default'
  ),
  (
    "apt-get update && apt-get install -y dataset-fashion-mnist g++ && pip install -e '.[test]' && "
    'ruff check . && ruff format --check . && python -m pytest -q -n 2 --dist loadgroup '
    '--max-worker-restart=0 --time-limit=1500 tests'
  ),
)
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _prose(text):
  """The text without code blocks and code spans, where brackets are not links."""
  text = re.sub(r'(?ms)^```.*?^```', '', text)
  return re.sub(r'`[^`\n]*`', '', text)


def _anchor(heading):
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r'`', '', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(path):
  return {_anchor(h) for h in re.findall(r'(?m)^#+ (.*)$', _prose(_read(path)))}


def test_readme_is_an_entry_page():
  readme = _read(os.path.join(ROOT, 'README.md'))
  assert len(readme.encode('utf-8')) < 12 * 1024
  for command in SET_UP_COMMANDS:
    assert f'```sh\n{command}\n```' in readme


@pytest.mark.parametrize('page', PAGES, ids=os.path.basename)
def test_every_relative_link_resolves(page):
  links = _LINK.findall(_prose(_read(page)))
  for link in links:
    if re.match(r'[a-z]+:', link):  # https:, mailto: and the like: not ours to check
      continue
    path, _, anchor = link.partition('#')
    target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(target), f'{page}: {link} names no file'
    if anchor:
      assert anchor in _anchors(target), f'{page}: {link} names no heading of {target}'


def test_the_anchor_rule_is_githubs():
  assert _anchor('Running on several hosts') == 'running-on-several-hosts'
  assert _anchor('Ranking: split the candidates, not the validation rows') == (
    'ranking-split-the-candidates-not-the-validation-rows'
  )
  assert _anchor('What a run writes (the workdir contract)') == (
    'what-a-run-writes-the-workdir-contract'
  )


def test_config_page_is_generated_from_the_schema():
  assert _read(os.path.join(ROOT, 'docs', 'config.md')) == config_doc.render(), (
    'docs/config.md is out of date: run python -m pgnas_jax.config_doc > docs/config.md'
  )


def _layout_rows() -> list[tuple[str, str]]:
  """docs/layout.md's table: (first cell's path, the whole row), in order."""
  text = _read(os.path.join(ROOT, 'docs', 'layout.md'))
  return [(m.group(2), m.group(1)) for m in re.finditer(r'(?m)^(\| `([^`]+)`.*)$', text)]


def _row_of(module: str, rows) -> int | None:
  """The row that lists ``module`` (a path under pgnas_jax/): its own, or its package's row
  naming its file; the C++ source goes with its Python module's row."""
  name = module[: -len('.cc')] + '.py' if module.endswith('.cc') else module
  for i, (path, row) in enumerate(rows):
    if path == name or (
      path.endswith('/') and name.startswith(path) and f'`{os.path.basename(name)}`' in row
    ):
      return i
  return None


def _modules() -> list[str]:
  """Every module of pgnas_jax/ (an empty package marker is none), relative to the root."""
  found = []
  for folder, _, files in os.walk(os.path.join(ROOT, 'pgnas_jax')):
    for name in files:
      path = os.path.join(folder, name)
      if name.endswith(('.py', '.cc')) and os.path.getsize(path):
        found.append(os.path.relpath(path, ROOT))
  return sorted(found)


def _imported(module: str) -> set[str]:
  """The pgnas_jax modules ``module`` imports (anywhere in it), as paths."""

  def path(dotted):
    base = os.path.join(*dotted.split('.'))
    if os.path.exists(os.path.join(ROOT, base + '.py')):
      return base + '.py'
    if os.path.isdir(os.path.join(ROOT, base)):
      return os.path.join(base, '__init__.py')
    return None

  found = set()
  for node in ast.walk(ast.parse(_read(os.path.join(ROOT, module)))):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('pgnas_jax'):
      for alias in node.names:
        found.add(path(f'{node.module}.{alias.name}') or path(node.module))
    elif isinstance(node, ast.Import):
      found |= {path(a.name) for a in node.names if a.name.startswith('pgnas_jax.')}
  return found - {None, 'pgnas_jax/__init__.py'}


def test_layout_lists_every_module_and_its_layering_holds():
  rows = _layout_rows()
  modules = _modules()
  assert len(modules) > 50
  missing = [m for m in modules if _row_of(m, rows) is None]
  assert not missing, f'docs/layout.md does not list {missing}'
  upward = [
    (m, target)
    for m in modules
    if m.endswith('.py')
    for target in _imported(m)
    if _row_of(target, rows) > _row_of(m, rows)
  ]
  assert not upward, f'modules importing rows below their own in docs/layout.md: {upward}'
