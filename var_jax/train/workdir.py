"""One run per workdir: ``<workdir>/lock.json`` names the run holding it (host, pid, process start, start time,
command line); taken when training starts, removed when it ends (normally, by an exception, or after SIGTERM).

A second run on a locked workdir is refused (``WorkdirLockedError`` naming the holder). A lock whose holder is on
this host and no longer running (its pid is gone, or now belongs to a process started at another time) is stale:
it is taken over with a warning. A lock of another host is never judged stale: delete the file if that run is dead.

Local paths are locked with an exclusive create (``O_EXCL``: atomic). Other paths (gs://, through ``etils.epath``)
check, write and read back: object stores have no exclusive create through epath, so two runs started within the
same moment may both get in; the read-back only narrows that window. Multi-process runs: process 0 takes the lock,
the others learn the outcome from a broadcast and fail together when it was refused.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from var_jax.train.errors import TrainingError, WorkdirError, WorkdirLockedError

logging = std_logging.getLogger('var_jax.train')

LOCK_FILE = 'lock.json'


def _proc_start(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), else None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: Optional[str]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass                     # exists, another user's
  now = _proc_start(pid)
  return start is None or now is None or now == start   # another start time: the pid was reused


def describe(holder: Dict[str, Any]) -> str:
  return (f'pid {holder["pid"]} on host {holder["host"]}, started {holder["started"]} '
          f'({" ".join(holder["argv"])[:200]})')


class WorkdirLock:
  """``acquire()`` / ``release()`` of ``<workdir>/lock.json`` (see the module doc)."""

  def __init__(self, workdir: str):
    from etils import epath
    self.workdir = str(workdir)
    self.path = epath.Path(workdir) / LOCK_FILE
    self.local = '://' not in self.workdir
    self.held = False
    self.me = {'host': socket.gethostname(), 'pid': os.getpid(), 'proc_start': _proc_start(os.getpid()),
               'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'argv': list(sys.argv)}

  def _create(self) -> bool:
    text = json.dumps(self.me, indent=1)
    if self.local:
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w') as f:
        f.write(text)
      return True
    if self.path.exists():
      return False
    self.path.write_text(text)
    return self._read() == self.me

  def _read(self) -> Optional[Dict[str, Any]]:
    try:
      d = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      return {}
    return d if isinstance(d, dict) else {}

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        self.held = True
        return
      holder = self._read()
      if holder is None:         # released meanwhile
        continue
      if not {'host', 'pid', 'proc_start', 'started', 'argv'} <= set(holder):
        raise WorkdirLockedError(f'{self.workdir} is locked by {self.path}, which is not a lock this code wrote '
                                 f'(unreadable); delete it if no run uses this workdir')
      if holder['host'] == self.me['host'] and not _alive(int(holder['pid']), holder['proc_start']):
        logging.warning('taking over the stale lock %s: its run (%s) is not running any more', self.path,
                        describe(holder))
        if self._read() == holder:
          self.path.unlink(missing_ok=True)
        continue
      raise WorkdirLockedError(f'{self.workdir} is in use by another run: {describe(holder)}; lock file '
                               f'{self.path}. Wait for it to finish, use another --workdir, or delete the lock file '
                               f'if that run is dead')
    raise WorkdirLockedError(f'could not take the lock {self.path} (another run keeps taking it)')

  def release(self):
    if not self.held:
      return
    self.held = False
    if self._read() == self.me:
      self.path.unlink(missing_ok=True)


def check_writable(workdir: str):
  """``WorkdirError`` naming the path unless files can be written into ``workdir`` (made if missing) and its
  ``checkpoints/`` (when there): a read-only or missing filesystem fails here, before any training."""
  from var_jax import fileio
  try:
    fileio.check_output_dir(workdir, '--workdir')
    if fileio.isdir(f'{workdir}/checkpoints'):
      fileio.check_output_dir(f'{workdir}/checkpoints', '--workdir (its checkpoints)', create=False)
  except fileio.OutputError as e:
    raise WorkdirError(str(e)) from None


def acquire_on_process_0(lock: WorkdirLock):
  """Process 0 checks that the workdir can be written (``check_writable``) and takes ``lock``; every process raises
  the error (``WorkdirError`` / ``WorkdirLockedError``) when either failed."""
  import jax
  err = None
  if jax.process_index() == 0:
    try:
      check_writable(lock.workdir)
      lock.acquire()
    except TrainingError as e:
      err = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok:
      raise err or WorkdirLockedError(f'process 0 could not write to or lock {lock.workdir} (its log says why)')
  elif err is not None:
    raise err
