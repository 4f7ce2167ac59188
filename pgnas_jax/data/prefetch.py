"""Reading ahead: a background thread prepares the next items (batches) while the caller
works on the current one."""

import queue
import threading
from collections.abc import Iterable, Iterator

_ITEM, _END, _ERROR = range(3)


def in_background(items: Iterable, depth: int = 2) -> Iterator:
  """Yields ``items`` in order, produced by a background thread up to ``depth`` ahead. An
  exception raised while producing is raised here; leaving the loop early (or closing the
  iterator) stops the producer after the item it is preparing."""
  buffer = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        buffer.put(entry, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put((_ITEM, item)):
          return
      put((_END, None))
    except BaseException as e:  # handed to the consumer, raised there
      put((_ERROR, e))

  threading.Thread(target=produce, daemon=True, name='pgnas_jax-prefetch').start()
  try:
    while True:
      kind, item = buffer.get()
      if kind == _END:
        return
      if kind == _ERROR:
        raise item
      yield item
  finally:
    stop.set()
