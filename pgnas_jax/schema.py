"""The building blocks of the config schema: a field (``Field``), a test its value must pass
(``Check``) and the common ones, and what resuming a run with another value of a field does.
``config.py`` declares the run's fields with them, and each super-network family its own
(``supernets``)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Check:
  """A test a field's value must pass, and what it must be (for the message and the docs)."""

  test: Callable[[Any], bool]
  what: str


POSITIVE = Check(lambda v: v > 0, '> 0')
NON_NEGATIVE = Check(lambda v: v >= 0, '>= 0')
# in float32, where the drop logits live: 1e-46 is 0 there, 1 - 1e-9 is 1
PROBABILITY = Check(
  lambda v: 0.0 < np.float32(v) < 1.0 and 0.0 < v < 1.0,
  'in (0, 1), and neither 0 nor 1 in float32 (about 1.4e-45 .. 1 - 6e-8)',
)
AUTO_OR_COUNT = Check(
  lambda v: v == 'auto' or (type(v) is int and v >= 1), "'auto' or a whole number >= 1"
)
EACH_POSITIVE = Check(lambda v: len(v) > 0 and all(x > 0 for x in v), 'non-empty, each > 0')
EACH_ODD = Check(
  lambda v: len(v) > 0 and all(k > 0 and k % 2 == 1 for k in v), 'non-empty, each an odd number > 0'
)


# What resuming a run with another value of a field does (``Field.on_resume``, ``resume.py``)
REFUSED = 'refused'  # it changes results: the run resumes only with the value it began with
KEPT = 'kept'  # it changes no result (logging, checkpoint cadence, a timing): resumed as is
RECHOOSE = 'rechoose'  # it changes only the choice among the scored candidates: chosen again
RESCORE = 'rescore'  # it changes the candidates, not the training: they are scored again


class _Original:
  """``Field.older_runs`` of a field every run has had."""

  def __repr__(self):
    return 'ORIGINAL'


ORIGINAL = _Original()


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. ``doc`` is its row in docs/config.md; ``choices`` or ``check`` what
  ``validate`` accepts; ``any_type`` lets a value of another type replace the default (the
  command line then parses it as a Python literal). ``on_resume``: what resuming a run with
  another value does (``REFUSED``, ``KEPT``, ``RECHOOSE``, ``RESCORE``); ``older_runs``: for
  a field added after runs were first made, the value a saved config without it ran with."""

  name: str  # dotted path, e.g. 'train.batch_size'
  default: Any
  doc: str
  choices: tuple = ()
  check: Check | None = None
  any_type: bool = False
  on_resume: str = REFUSED
  older_runs: Any = ORIGINAL
