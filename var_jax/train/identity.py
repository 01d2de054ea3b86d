"""A run's identity: what a workdir's checkpoints were trained with, checked before a rerun resumes them.

Every training checkpoint's config item holds the run's config (resolved: ``reference_args``, hub names, stage
references) and, under ``RECORD_KEY``, a fingerprint of each frozen input (``inputs``):

* the weights files the task reads and never trains — ``Task.frozen_input_keys``: VAR's ``vae_ckpt``, ELM/BiGR's
  ``bae_ckpt``, the tokenizer trainer's ``loss.lpips_path`` — as the sha256 of the file's bytes (a directory: of its
  files, relative names included), with its path, size and mtime (an unchanged path, size and mtime reuse the
  recorded hash: a resume does not re-read a large file); an empty key is a seeded random init;
* the data: the train split's size and class count (``data.*`` settings are compared as config);
* the token cache (``data.token_cache``): the sha256 of its ``manifest.json``.

A rerun resumes only the same run: ``check(saved, config, inputs, where)`` refuses (``ResumeError``, one line) a
config or an input that differs from the checkpoint's, naming each ``key: old -> new``. Keys that may change are
``config.resume_safe`` (configs/common.py: step counts, intervals, workers, batch size, mesh, sampling settings —
what does not change what the weights learn from) plus the user's ``config.resume_changes`` (a comma list of dotted
keys; a key names its whole sub-tree, e.g. ``optim``; ``*``: any); the inputs only by the latter. Inputs are named
by their config key (``--config.resume_changes=vae_ckpt``); the data's sizes as ``data``. A moved but identical file passes (its hash
is compared, not its path). Keys only one side has (a config written by another var_jax version) are not compared.
"""
from __future__ import annotations

import hashlib
import json
import logging as std_logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

from var_jax.train import errors

logging = std_logging.getLogger('var_jax.train')

RECORD_KEY = '_run_inputs'           # the inputs' fingerprints inside a checkpoint's config item
ALWAYS_IGNORED = ('resume_changes', 'resume_safe')
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------- fingerprints
def _stat(p) -> Tuple:
  """What changes when a file is rewritten: locally size, mtime, ctime and inode (``cp -p`` keeps an mtime, not a
  ctime); a remote object's size and mtime."""
  import os
  from var_jax import fileio
  if not fileio.is_remote(p):
    st = os.stat(os.fspath(p))
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
  st = p.stat()
  return int(getattr(st, 'length', 0) or 0), float(getattr(st, 'mtime', 0) or 0)


def _files(path: str) -> List[Tuple[str, Any]]:
  """(relative name, epath) of every file under a directory (sorted), or [('', path)] for a file."""
  from var_jax import fileio
  root = fileio.path(path)
  if not root.is_dir():
    return [('', root)]
  out = []
  for p in sorted(root.rglob('*')):
    if not p.is_dir():
      out.append((str(p.relative_to(root)), p))
  return out


def file_fingerprint(path: str, key: str, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """``{'path', 'stat', 'sha256'}`` of the file or directory at ``path`` (``''``: a seeded random init); the hash of
  ``previous`` is reused when its path and stat (size and mtime of every file) are those of now."""
  from var_jax import fileio
  if not path:
    return {'path': '', 'sha256': 'random-init'}
  if not fileio.exists(path):
    raise errors.ConfigError(f'config.{key}={path}: no such file or directory')
  files = _files(path)
  stat = hashlib.sha256(json.dumps([(n, *_stat(p)) for n, p in files]).encode()).hexdigest()[:16]
  if previous and previous.get('path') == str(path) and previous.get('stat') == stat and previous.get('sha256'):
    return dict(previous)
  h = hashlib.sha256()
  for name, p in files:
    h.update(name.encode() + b'\0')
    with p.open('rb') as f:
      while True:
        b = f.read(_CHUNK)
        if not b:
          break
        h.update(b)
  return {'path': str(path), 'stat': stat, 'sha256': h.hexdigest()}


def _get(config, dotted: str):
  v = config
  for k in dotted.split('.'):
    v = v[k]
  return v


def inputs(config, frozen_keys: Iterable[str], source, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """The frozen inputs' fingerprints of a run (see the module doc); ``previous``: a saved record (hash reuse)."""
  previous = previous or {}
  out: Dict[str, Any] = {}
  for key in frozen_keys:
    out[key] = file_fingerprint(str(_get(config, key)), key, previous.get(key))
  out['data'] = {'train_examples': int(len(source)), 'num_classes': int(getattr(source, 'num_classes', 0) or 0)}
  if 'token_cache' in config.data and config.data.token_cache:
    from var_jax.data import token_cache
    out['data.token_cache'] = file_fingerprint(f'{config.data.token_cache}/{token_cache.MANIFEST}',
                                               'data.token_cache', previous.get('data.token_cache'))
  return out


# ----------------------------------------------------------------------------- comparison
def flatten(d, prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def _keys(text) -> List[str]:
  if isinstance(text, (list, tuple)):
    return [str(k).strip() for k in text if str(k).strip()]
  return [k.strip() for k in str(text or '').split(',') if k.strip()]


def _covered(key: str, allowed: List[str]) -> bool:
  return any(a == '*' or key == a or key.startswith(a + '.') for a in allowed)


def _short(v) -> str:
  if isinstance(v, dict) and 'sha256' in v:
    if v['sha256'] == 'random-init':
      return "'' (random init)"
    return f'{v["path"]} (sha256 {v["sha256"][:12]})'
  if isinstance(v, dict):
    return ', '.join(f'{k} {w}' for k, w in v.items())
  s = json.dumps(v)
  return s if len(s) <= 80 else s[:77] + '...'


def differences(saved: Dict[str, Any], config, current_inputs: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
  """(key, old, new) of every config value and input that differs from the checkpoint's and may not change."""
  user = _keys(config.resume_changes)
  allowed = _keys(config.resume_safe) + user + list(ALWAYS_IGNORED)
  saved = dict(saved)
  saved_inputs = saved.pop(RECORD_KEY, None)
  old, new = flatten(saved), flatten(json.loads(config.to_json_best_effort()))
  input_keys = set(current_inputs)
  out = []
  for k in sorted(set(old) & set(new)):
    if k in input_keys or _covered(k, allowed):
      continue
    if old[k] != new[k]:
      out.append((k, old[k], new[k]))
  if saved_inputs is not None:
    for k in sorted(set(saved_inputs) & input_keys):
      if _covered(k, user):          # a frozen input is never safe to change: only the user's list allows it
        continue
      a, b = saved_inputs[k], current_inputs[k]
      same = a.get('sha256') == b.get('sha256') if isinstance(a, dict) and 'sha256' in a else a == b
      if not same:
        out.append((k, a, b))
  return out


def check(saved: Dict[str, Any], config, current_inputs: Dict[str, Any], where: str):
  """``ResumeError`` (one line) when checkpoint ``where``'s run (its saved config item ``saved``) is not this one."""
  diff = differences(saved, config, current_inputs)
  if not diff:
    if RECORD_KEY not in saved:
      logging.warning('%s records no input fingerprints (saved by an older var_jax): its frozen inputs (tokenizer '
                      'weights, data) are not checked', where)
    return
  what = '; '.join(f'{k}: {_short(a)} -> {_short(b)}' for k, a, b in diff)
  keys = ','.join(k for k, _, _ in diff)
  raise errors.ResumeError(
      f'{where} is another run: {what}. A rerun resumes only the same run: use another --workdir, or allow these '
      f'changes with --config.resume_changes={keys}')


def saved_record(saved: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
  return None if saved is None else saved.get(RECORD_KEY)


class RunIdentity:
  """The identity of the run ``config`` is about to train: its inputs' fingerprints (computed once, on first use,
  reusing the hashes of the checkpoint it is compared with) and the check against a checkpoint's saved config."""

  def __init__(self, config, frozen_keys: Iterable[str], source):
    self.config, self.frozen_keys, self.source = config, tuple(frozen_keys), source
    self._inputs = None

  def inputs(self, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    if self._inputs is None:
      self._inputs = inputs(self.config, self.frozen_keys, self.source, previous)
    return self._inputs

  def check(self, saved: Dict[str, Any], where: str):
    check(saved, self.config, self.inputs(saved_record(saved)), where)
