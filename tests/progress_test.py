"""``var_jax.progress``: plain log lines when stderr is not a terminal (the default in CI and batch jobs), a tqdm bar
when forced (argument or VAR_JAX_PROGRESS), nothing when off."""
import io

import pytest

from var_jax import progress


class _Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self._tty = tty

  def isatty(self):
    return self._tty


def test_non_tty_prints_plain_lines(monkeypatch):
  monkeypatch.delenv(progress.ENV_MODE, raising=False)
  s = _Stream(tty=False)
  with progress.Progress(10, 'sampling', unit='images', stream=s, every_s=0) as bar:
    assert bar.mode == 'log'
    for _ in range(5):
      bar.update(2)
  lines = s.getvalue().splitlines()
  assert lines[0].startswith('sampling: 2/10 images (20.0%), ') and 'images/s, ETA ' in lines[0]
  assert len(lines) == 5 and lines[-1].startswith('sampling: 10 images in ')   # no line at 10/10, one summary
  assert '\r' not in s.getvalue()


def test_log_lines_are_periodic(monkeypatch):
  monkeypatch.delenv(progress.ENV_MODE, raising=False)
  got = []
  with progress.Progress(100, 'features', log=got.append, stream=_Stream(False), every_s=3600) as bar:
    for _ in range(100):
      bar.update()
  assert len(got) == 1 and got[0].startswith('features: 100 it in ')           # only the summary


def test_tty_and_forced_modes_use_tqdm(monkeypatch):
  from tqdm import tqdm
  monkeypatch.delenv(progress.ENV_MODE, raising=False)
  tty = _Stream(tty=True)
  with progress.Progress(4, 'converting', stream=tty) as bar:
    assert bar.mode == 'bar' and isinstance(bar._bar, tqdm)
    bar.update(4)
  assert 'converting' in tty.getvalue() and '4/4' in tty.getvalue()
  monkeypatch.setenv(progress.ENV_MODE, 'bar')
  s = _Stream(tty=False)
  assert list(progress.track(range(3), 'cache', stream=s)) == [0, 1, 2]
  assert '3/3' in s.getvalue()
  monkeypatch.setenv(progress.ENV_MODE, 'off')
  s = _Stream(tty=True)
  with progress.Progress(2, 'x', stream=s) as bar:
    bar.update(2)
  assert s.getvalue() == ''
  monkeypatch.setenv(progress.ENV_MODE, 'fancy')
  with pytest.raises(ValueError, match=r"progress mode must be one of auto, bar, log, off .*VAR_JAX_PROGRESS.*'fancy'"):
    progress.Progress(1, 'x')
