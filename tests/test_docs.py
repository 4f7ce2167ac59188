"""The documentation: an entry-page README, links that resolve, a config page that matches the
config schema."""

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
