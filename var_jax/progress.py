"""Progress of the long jobs a user watches (50k-sample FID runs, Inception features, probe features, token
caches): a ``tqdm`` bar with rate and ETA in a terminal, plain periodic log lines otherwise, nothing on
processes other than 0.

The mode: the ``mode`` argument, else the ``VAR_JAX_PROGRESS`` environment variable, else 'auto':

- 'auto': a bar when stderr is a terminal, else log lines;
- 'bar': a bar always (e.g. in a notebook, or a CI log that renders carriage returns);
- 'log': a line ``<desc>: <done>/<total> <unit> (<pct>%), <rate> <unit>/s, ETA <t>`` at most every ``every_s``
  seconds (``VAR_JAX_PROGRESS_EVERY_S``, default 30) and one at the end;
- 'off': nothing.

Usage::

  with progress.Progress(len(todo), 'sampling', unit='images') as bar:
    for batch in batches:
      ...
      bar.update(len(batch))
  for x in progress.track(items, desc='converting'):   # an iterable, wrapped
    ...
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

MODES = ('auto', 'bar', 'log', 'off')
ENV_MODE = 'VAR_JAX_PROGRESS'
ENV_EVERY = 'VAR_JAX_PROGRESS_EVERY_S'
EVERY_S = 30.0          # log mode: seconds between lines

T = TypeVar('T')


def _process_index() -> int:
  if 'jax' not in sys.modules:           # nothing initialised JAX: a single-process tool
    return 0
  import jax
  return jax.process_index()


def resolve_mode(mode: Optional[str] = None, stream=None) -> str:
  """'bar', 'log' or 'off' for this process (see the module doc)."""
  mode = mode or os.environ.get(ENV_MODE, '').strip().lower() or 'auto'
  if mode not in MODES:
    raise ValueError(f'progress mode must be one of {", ".join(MODES)} (argument or ${ENV_MODE}), got {mode!r}')
  if mode == 'off' or _process_index() != 0:
    return 'off'
  if mode == 'auto':
    stream = stream or sys.stderr
    return 'bar' if getattr(stream, 'isatty', lambda: False)() else 'log'
  return mode


def _duration(s: float) -> str:
  s = int(round(s))
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s'


class Progress:
  """``total`` units of work named ``desc``; ``update(n)`` after each piece, ``close()`` (or ``with``) at the end.
  ``log``: where log-mode lines go (default: stderr)."""

  def __init__(self, total: Optional[int], desc: str, unit: str = 'it', *, mode: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None, every_s: Optional[float] = None, stream=None):
    self.total, self.desc, self.unit = total, desc, unit
    self.stream = stream or sys.stderr
    self.mode = resolve_mode(mode, self.stream)
    self.n = 0
    self._log = log or (lambda msg: print(msg, file=self.stream, flush=True))
    self._every = float(os.environ.get(ENV_EVERY, EVERY_S)) if every_s is None else float(every_s)
    self._t0 = self._last = time.perf_counter()
    self._bar = None
    self._closed = False
    if self.mode == 'bar':
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, smoothing=0.1)

  def update(self, n: int = 1):
    self.n += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.mode == 'log':
      now = time.perf_counter()
      if now - self._last >= self._every and (self.total is None or self.n < self.total):
        self._last = now
        self._log(self.line(now))

  def update_to(self, done: int, total: Optional[int] = None):
    """Set the count to ``done`` (for callbacks that report totals, e.g. ``(done, total)``)."""
    if total is not None and self.total is None:
      self.total = total
      if self._bar is not None:
        self._bar.total = total
    self.update(done - self.n)

  def line(self, now: Optional[float] = None) -> str:
    """The log-mode line now."""
    dt = max((now or time.perf_counter()) - self._t0, 1e-9)
    rate = self.n / dt
    if self.total:
      eta = (self.total - self.n) / rate if rate > 0 else float('inf')
      eta_s = _duration(eta) if eta != float('inf') else '?'
      return (f'{self.desc}: {self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.1f}%), '
              f'{rate:.2f} {self.unit}/s, ETA {eta_s}')
    return f'{self.desc}: {self.n} {self.unit}, {rate:.2f} {self.unit}/s'

  def close(self):
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.mode == 'log' and self.n:
      dt = time.perf_counter() - self._t0
      self._log(f'{self.desc}: {self.n} {self.unit} in {_duration(dt)}, {self.n / max(dt, 1e-9):.2f} {self.unit}/s')

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc):
    self.close()


def track(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = 'it', **kw) -> Iterator[T]:
  """``iterable`` with one ``update`` per item (``total`` defaults to its ``len`` when it has one)."""
  if total is None and hasattr(iterable, '__len__'):
    total = len(iterable)
  with Progress(total, desc, unit, **kw) as bar:
    for x in iterable:
      yield x
      bar.update(1)
