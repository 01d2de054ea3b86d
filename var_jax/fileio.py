"""The one file layer of var_jax: every path goes through ``etils.epath`` (local files, ``gs://`` and any filesystem
epath knows), and every file an entry point produces is written atomically, so that a killed or failing run never
leaves a truncated file under the final name and never replaces a good file with a partial one.

- Local paths: the bytes go to a hidden temporary file beside the target (same directory, so same filesystem), are
  flushed and fsynced, then ``os.replace``-d over the target.
- Remote paths (``gs://`` ...): an object store publishes an object only when its upload completes, so the write
  goes to the final name directly (a rename there would be a copy plus a delete).

``check_output_dir`` / ``check_output_file`` test a destination *before* the work that fills it (write a probe file,
then delete it), raising ``OutputError`` naming the flag or argument and the path.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import uuid
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
  """A destination that cannot be written (the message names the flag or argument and the path)."""


def path(p: PathLike):
  """``p`` as an ``epath.Path`` (local or remote)."""
  from etils import epath
  return epath.Path(p)


def is_remote(p: PathLike) -> bool:
  """True for URL-like paths (``gs://bucket/x``, ``s3://...``): not the local filesystem."""
  return '://' in os.fspath(p)


def abspath(p: PathLike) -> str:
  """``os.path.abspath`` for local paths; a remote path as it is (``abspath('gs://b/x')`` would make it local)."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  p = path(p)
  return p.exists() and not p.is_dir()


def listdir(p: PathLike) -> list:
  """The sorted entry names of directory ``p``. A remote "directory" exists only while objects are below it, so an
  empty (or just made) one lists as ``[]`` instead of raising ``FileNotFoundError``."""
  if is_remote(p) and not path(p).exists():
    return []
  return sorted(x.name for x in path(p).iterdir())


def makedirs(p: PathLike) -> str:
  """``mkdir -p`` (local or remote)."""
  path(p).mkdir(parents=True, exist_ok=True)
  return os.fspath(p)


def rmtree(p: PathLike):
  """Remove a directory tree (local or remote); a missing one is fine."""
  p = os.fspath(p)
  if not is_remote(p):
    if os.path.isdir(p):
      shutil.rmtree(p)
  elif path(p).exists():
    path(p).rmtree()


_loop_warned = set()


def walk_local(root: str, tree: Optional[str] = None, hidden: bool = True):
  """``os.walk(root, followlinks=True)`` (top-down; yields ``(dirpath, dirnames, filenames)``) that enters no
  directory twice: a directory symlink leading to a directory already listed (a loop), or back into ``tree`` (a
  folder holding ``root``, default ``root`` itself: it is listed there already, or will be), is not followed; the
  first such link of a walk is warned about once (naming it and its target), with the count. Links leading out of
  the tree (data on another disk) are followed. ``hidden=False`` skips names starting with '.'."""
  tree_real = os.path.realpath(tree or root)
  seen = {os.path.realpath(root)}
  skipped = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    keep = []
    for d in sorted(dirnames):
      if not hidden and d.startswith('.'):
        continue
      p = os.path.join(dirpath, d)
      real = os.path.realpath(p)
      back = os.path.islink(p) and (real == tree_real or real.startswith(tree_real.rstrip(os.sep) + os.sep))
      if real in seen or back:
        skipped.append((p, real))
        continue
      seen.add(real)
      keep.append(d)
    dirnames[:] = keep
    yield dirpath, dirnames, [f for f in filenames if hidden or not f.startswith('.')]
  if skipped and (root, len(skipped)) not in _loop_warned:
    _loop_warned.add((root, len(skipped)))
    from absl import logging
    logging.warning('%s: not following %d directory symlink(s) that lead back into the tree or to a directory '
                    'already listed (a loop), e.g. %s -> %s', root, len(skipped), *skipped[0])


def find_files(root: PathLike, suffixes: tuple) -> list:
  """Every file below ``root`` (recursive, hidden names skipped) whose name ends with one of ``suffixes``
  (case-insensitive), as sorted path strings; local (following directory links, never back into the tree or round
  a loop: ``walk_local``) or remote (one listing per directory)."""
  root = os.fspath(root)
  suffixes = tuple(x.lower() for x in suffixes)
  if not is_remote(root):
    out = []
    for dirpath, _, filenames in walk_local(root, hidden=False):
      out += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(suffixes)
              and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(out)
  scheme = root.split('://', 1)[0] + '://'
  out = []
  for dirpath, _, filenames in path(root).walk():
    d = os.fspath(dirpath)
    d = d if '://' in d else scheme + d          # epath's walk drops the scheme of remote dirpaths
    out += [f'{d.rstrip("/")}/{n}' for n in filenames if n.lower().endswith(suffixes)]
  return sorted(out)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
  """A local file path holding ``p``'s bytes, for readers that need a real file (``torch.load(mmap=)``, PIL's
  lazy readers, zipfile headers ...): ``p`` itself when local, else a temporary copy (deleted on exit)."""
  p = os.fspath(p)
  if not is_remote(p):
    yield p
    return
  d = tempfile.mkdtemp(prefix='var_jax_remote_')
  try:
    local = os.path.join(d, os.path.basename(p.rstrip('/')) or 'file')
    with path(p).open('rb') as src, open(local, 'wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
    yield local
  finally:
    shutil.rmtree(d, ignore_errors=True)


def _tmp_name(target: str) -> str:
  d, name = os.path.split(target)
  return os.path.join(d, f'.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')


@contextlib.contextmanager
def atomic_open(target: PathLike, mode: str = 'wb') -> Iterator[io.IOBase]:
  """A file object for ``target`` (``mode`` 'wb' or 'w'); on a clean exit the content appears under ``target`` at
  once, on an exception nothing of it does (and an existing ``target`` is left as it was)."""
  if mode not in ('wb', 'w'):
    raise ValueError(f'atomic_open: mode {mode!r} (use "wb" or "w")')
  target = os.fspath(target)
  if is_remote(target):
    with path(target).open(mode) as f:
      yield f
    return
  tmp = _tmp_name(target)
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[str]:
  """A local path to write ``target`` through, for writers that take a file name (e.g. ArrayRecord's C++ writer):
  on a clean exit the file is fsynced and published as ``target`` (renamed locally, uploaded remotely), on an
  exception nothing of it appears (an existing ``target`` is left as it was)."""
  target = os.fspath(target)
  remote = is_remote(target)
  d = tempfile.mkdtemp(prefix='var_jax_atomic_') if remote else None
  tmp = os.path.join(d, 'file') if remote else _tmp_name(target)
  try:
    yield tmp
    if remote:
      with open(tmp, 'rb') as src, path(target).open('wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    else:
      with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
      os.replace(tmp, target)
  finally:
    if remote:
      shutil.rmtree(d, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(tmp)


def atomic_write_bytes(target: PathLike, data: bytes) -> str:
  with atomic_open(target, 'wb') as f:
    f.write(data)
  return os.fspath(target)


def atomic_write_text(target: PathLike, text: str) -> str:
  with atomic_open(target, 'w') as f:
    f.write(text)
  return os.fspath(target)


def atomic_save(target: PathLike, save: Callable[[io.IOBase], None]) -> str:
  """Run ``save(file_object)`` (e.g. ``lambda f: np.savez(f, ...)`` or ``lambda f: torch.save(obj, f)``) into a
  temporary file, then publish it as ``target``."""
  with atomic_open(target, 'wb') as f:
    save(f)
  return os.fspath(target)


def _probe(directory: str, what: str):
  probe = os.path.join(directory, f'.var_jax-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  try:
    path(probe).write_bytes(b'')
    path(probe).unlink()
  except Exception as e:  # noqa: BLE001 - any failure means "cannot write here"
    raise OutputError(f'{what}: cannot write to directory {directory}: {e}') from None


def check_output_dir(directory: PathLike, what: str, create: bool = True) -> str:
  """Make sure files can be written into ``directory`` (made if missing and ``create``), before any work.
  ``what`` names the flag or argument (e.g. ``'--out_dir'``)."""
  directory = os.fspath(directory)
  p = path(directory)
  if p.exists() and not p.is_dir():
    raise OutputError(f'{what}: {directory} exists and is not a directory')
  if not p.exists():
    if not create:
      raise OutputError(f'{what}: directory {directory} does not exist')
    try:
      p.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001
      raise OutputError(f'{what}: cannot create directory {directory}: {e}') from None
  _probe(directory, what)
  return directory


def check_output_file(target: PathLike, what: str, create_parent: bool = True,
                      suffixes: Optional[tuple] = None) -> str:
  """Make sure ``target`` can be written as a file (not a directory; parent writable), before any work. ``suffixes``:
  the allowed file name endings (e.g. ``('.npz',)``)."""
  target = os.fspath(target)
  if not target or target.endswith(('/', os.sep)):
    raise OutputError(f'{what}: {target!r} names a directory, not a file')
  p = path(target)
  if p.exists() and p.is_dir():
    raise OutputError(f'{what}: {target} is a directory, not a file')
  if suffixes and not target.endswith(tuple(suffixes)):
    raise OutputError(f'{what}: {target} must end with {" or ".join(suffixes)}')
  parent = os.path.dirname(target) or '.'
  check_output_dir(parent, what, create=create_parent)
  return target
