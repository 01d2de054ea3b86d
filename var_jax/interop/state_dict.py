"""Reference-checkpoint machinery shared by every family: state_dict files, layout tables, import and export.

A family module (``var``, ``bae``, ``elm``, ``bigr``) describes the reference module as data: a table of ``Entry``
rows, in the reference's ``state_dict`` order, each with its torch key and shape and where it lives in our variables.
``import_state_dict`` and ``export_state_dict`` walk that table, so import and export cannot drift apart, and an
export loads in the reference with ``load_state_dict(strict=True)``.

``load_state_dict`` is the one reader of checkpoint files. torch is optional: only ``.pth`` files need it (loaded
with ``weights_only=True``: a checkpoint must not run code); ``.safetensors`` files need only ``safetensors``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util
from flax.core import meta

Array = np.ndarray
StateDict = Dict[str, Array]


class CheckpointMismatchError(ValueError):
  """A state_dict does not fit the expected layout (names the key, the expected and the found shape)."""


class CheckpointFileError(ValueError):
  """A file that cannot be read as a state_dict: missing data, truncated, not a checkpoint (names the file, why)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One reference tensor: torch key and shape, and our location (collection + path), or a derived buffer.

  ``collection`` None: a buffer derived from the config (``value``); import checks it (exactly, or within ``tol`` =
  (rtol, atol)), export writes ``value()``. ``alias_of``: the same tensor registered under a second key (import
  checks the two agree, export writes the primary's array). ``optional``: import accepts its absence.
  ``resettable``: a stored tensor with another leading size is reset to zeros (a statistics buffer).
  """
  key: str
  shape: Tuple[int, ...]
  collection: Optional[str]                 # 'params', another variable collection, or None (derived buffer)
  path: Tuple[str, ...] = ()
  to_torch: Callable[[Array], Array] = lambda a: a
  from_torch: Callable[[Array], Array] = lambda a: a
  value: Optional[Callable[[], Array]] = None
  dtype: Any = np.float32
  tol: Optional[Tuple[float, float]] = None
  alias_of: Optional[str] = None
  optional: bool = False
  resettable: bool = False


# ----------------------------------------------------------------------------- table builders
def _oihw_to_hwio(a):
  return np.transpose(a, (2, 3, 1, 0))


def _hwio_to_oihw(a):
  return np.transpose(a, (3, 2, 0, 1))


def param_entry(key: str, shape: Tuple[int, ...], path: Tuple[str, ...]) -> Entry:
  """A parameter stored as is (embedding tables, norm weights, biases)."""
  return Entry(key, shape, 'params', path)


def conv_entries(key: str, path: Tuple[str, ...], cin: int, cout: int, k: int, bias: bool = True) -> List[Entry]:
  """``nn.Conv2d``: weight (out, in, k, k) <-> kernel (k, k, in, out), bias."""
  out = [Entry(f'{key}.weight', (cout, cin, k, k), 'params', path + ('kernel',), to_torch=_hwio_to_oihw,
               from_torch=_oihw_to_hwio)]
  if bias:
    out.append(param_entry(f'{key}.bias', (cout,), path + ('bias',)))
  return out


def dense_entries(key: str, path: Tuple[str, ...], din: int, dout: int, bias: bool = True) -> List[Entry]:
  """``nn.Linear``: weight (out, in) <-> kernel (in, out), bias."""
  out = [Entry(f'{key}.weight', (dout, din), 'params', path + ('kernel',), to_torch=np.transpose,
               from_torch=np.transpose)]
  if bias:
    out.append(param_entry(f'{key}.bias', (dout,), path + ('bias',)))
  return out


def norm_entries(key: str, path: Tuple[str, ...], c: int) -> List[Entry]:
  """An affine norm (GroupNorm / LayerNorm): weight -> scale, bias."""
  return [param_entry(f'{key}.weight', (c,), path + ('scale',)), param_entry(f'{key}.bias', (c,), path + ('bias',))]


def reshaped_entry(key: str, torch_shape: Tuple[int, ...], path: Tuple[str, ...],
                   our_shape: Tuple[int, ...]) -> Entry:
  """A parameter stored with another shape (e.g. torch (1, L, C) <-> ours (L, C))."""
  return Entry(key, torch_shape, 'params', path, to_torch=lambda a: np.reshape(a, torch_shape),
               from_torch=lambda a: np.reshape(a, our_shape))


def our_shape(e: Entry) -> Tuple[int, ...]:
  """The shape of an entry in our variables."""
  return tuple(e.from_torch(np.broadcast_to(np.float32(0), e.shape)).shape)


# ----------------------------------------------------------------------------- config inference helpers
def require(sd: Mapping[str, Any], key: str, what: str):
  """``sd[key]``, or a ``CheckpointMismatchError`` saying ``what`` cannot be inferred without it."""
  if key not in sd:
    raise CheckpointMismatchError(f'cannot infer {what}: key {key!r} is missing from the state_dict')
  return sd[key]


def shape_of(sd: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  return tuple(int(s) for s in np.shape(sd[key]))


def indices(sd: Mapping[str, Any], pattern: str) -> List[int]:
  """The sorted distinct integers captured by ``pattern`` (group 1, matched at the key start) over the keys."""
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def field_value(config_cls, given: Mapping[str, Any], name: str):
  """``given[name]`` when given, else the default of the dataclass field ``name`` of ``config_cls``."""
  if name in given:
    return given[name]
  return {f.name: f.default for f in dataclasses.fields(config_cls)}[name]


def vote(sd: Mapping[str, Any], what: str, sources: Sequence[Tuple[str, int]]) -> int:
  """The size ``what`` that most of ``sources`` ((key, axis) pairs; absent keys skipped) agree on; a tie goes to the
  earliest source. So one corrupted tensor among many is outvoted, and the mismatch check then names it."""
  got = [(k, int(np.shape(sd[k])[a])) for k, a in sources if k in sd and len(np.shape(sd[k])) > a]
  if not got:
    raise CheckpointMismatchError(f'cannot infer {what}: none of {[k for k, _ in sources][:4]} is in the state_dict')
  counts = collections.Counter(v for _, v in got)
  best = max(counts.values())
  return next(v for _, v in got if counts[v] == best)


def count_indices(sd: Mapping[str, Any], pattern: str) -> int:
  """How many distinct indices ``pattern`` captures, e.g. the number of ``layers.{i}.`` blocks."""
  return len(indices(sd, pattern))


# ----------------------------------------------------------------------------- import / export
def check_state_dict(sd: Mapping[str, Any], table: Sequence[Entry], what: str):
  """Every key of ``table`` present (unless optional) with its shape, and no other key; else one error naming all."""
  expected = {e.key: e for e in table}
  problems = []
  for e in table:
    if e.key not in sd:
      if not e.optional:
        problems.append(f'missing key {e.key!r} (expected shape {e.shape})')
      continue
    found = shape_of(sd, e.key)
    if found != e.shape and not (e.resettable and found[1:] == e.shape[1:]):
      problems.append(f'key {e.key!r}: expected shape {e.shape}, found {found}')
  problems += [f'unexpected key {k!r} (found shape {shape_of(sd, k)})' for k in sd if k not in expected]
  if problems:
    raise CheckpointMismatchError(f'{what} state_dict does not match the config:\n  ' + '\n  '.join(problems))


def _check_buffer(e: Entry, a: Array, what: str):
  want = e.value()
  if e.tol is None:
    same = np.array_equal(a.astype(want.dtype), want)
  else:
    same = np.allclose(a.astype(np.float64), want.astype(np.float64), rtol=e.tol[0], atol=e.tol[1])
  if not same:
    diff = np.max(np.abs(a.astype(np.float64) - want.astype(np.float64))) if a.size else 0.0
    raise CheckpointMismatchError(f'{what}: buffer {e.key!r} disagrees with the config (max abs diff {diff:.3g}); '
                                  f'the checkpoint does not fit this model')


def _is_float(dtype) -> bool:
  return np.issubdtype(dtype, np.floating)


def require_integer(sd: Mapping[str, Any], key: str, what: str = 'checkpoint') -> Array:
  """``sd[key]`` as an integer array (an index buffer such as VAR's ``lvl_1L``), else an error naming the key and
  its dtype (a float buffer is not silently truncated)."""
  a = np.asarray(sd[key])
  if not np.issubdtype(a.dtype, np.integer):
    raise CheckpointMismatchError(f'{what}: key {key!r} is stored as {a.dtype}, expected an integer buffer (int64)')
  return a


def _dtype_of(a: Any) -> np.dtype:
  """The numpy dtype of a numpy array, a jax array or an in-memory torch tensor (``torch.float32`` -> float32;
  torch's bfloat16 -> ml_dtypes' bfloat16)."""
  dt = getattr(a, 'dtype', None)
  if dt is None:
    return np.asarray(a).dtype
  try:
    return np.dtype(dt)
  except TypeError:
    name = str(dt).rsplit('.', 1)[-1]       # 'torch.float32' -> 'float32'
    if name == 'bfloat16':
      import ml_dtypes
      return np.dtype(ml_dtypes.bfloat16)
    try:
      return np.dtype(name)
    except TypeError:
      raise CheckpointMismatchError(f'unsupported tensor dtype {dt}') from None


def _as_numpy(a: Any) -> np.ndarray:
  """A numpy view of an array or an in-memory torch tensor (torch's bfloat16, which numpy cannot view, as float32)."""
  if type(a).__module__.startswith('torch'):
    a = a.detach().cpu()
    if str(a.dtype) == 'torch.bfloat16':
      a = a.float()
    return a.numpy()
  return np.asarray(a)


def validate_tensors(sd: Mapping[str, Any], table: Sequence[Entry], what: str = 'checkpoint',
                     allow_cast: bool = False) -> Dict[str, Any]:
  """The values check of every import (the shapes are ``check_state_dict``'s): a stored parameter must be a
  floating-point tensor (float16/bfloat16/float32/float64) holding no NaN/inf; a derived buffer must have its
  expected kind (integer or floating). One error lists every offending key (dtype, expected dtype, how many
  non-finite elements). ``allow_cast``: cast integer parameters to float32 and buffers to their dtype instead (with
  a warning); non-finite values are never accepted. Returns ``sd`` (a copy with the cast arrays, if any)."""
  problems, cast = [], {}
  for e in table:
    if e.key not in sd or e.alias_of is not None:
      continue
    a = sd[e.key]
    dt = _dtype_of(a)
    want_float = _is_float(e.dtype)
    ok_kind = _is_float(dt) if want_float else np.issubdtype(dt, np.integer)
    if not ok_kind:
      want = 'a floating dtype (float32)' if want_float else f'an integer dtype ({np.dtype(e.dtype).name})'
      if allow_cast and (np.issubdtype(dt, np.number) or dt == np.bool_):
        logging.warning('%s: casting %r from %s to %s (allow_cast)', what, e.key, dt,
                        'float32' if want_float else np.dtype(e.dtype).name)
        cast[e.key] = _as_numpy(a).astype(np.float32 if want_float else e.dtype)
        continue
      problems.append(f'key {e.key!r} is stored as {dt}, expected {want}')
      continue
    if e.collection is not None and _is_float(dt):
      arr = _as_numpy(a)
      bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
      if bad:
        problems.append(f'key {e.key!r} holds {bad} non-finite value{"s" if bad > 1 else ""} (NaN/inf) among its '
                        f'{arr.size} elements')
  if problems:
    more = f'; and {len(problems) - 5} more keys' if len(problems) > 5 else ''
    hint = '' if not any('stored as' in p for p in problems) else ' (allow_cast=True / --allow_weight_cast casts)'
    raise CheckpointMismatchError(f'{what}: bad weights: ' + '; '.join(problems[:5]) + more + hint)
  return {**sd, **cast} if cast else sd


def validate_arrays(arrays: Mapping[str, Any], what: str = 'checkpoint'):
  """``validate_tensors`` without a layout table (our own checkpoints: every leaf named by its path): a floating
  array must hold no NaN/inf; one error lists the offending names and counts."""
  problems = []
  for name, a in arrays.items():
    a = np.asarray(a)
    if _is_float(a.dtype) or a.dtype.name == 'bfloat16':
      bad = int(a.size - np.count_nonzero(np.isfinite(a.astype(np.float32))))
      if bad:
        problems.append(f'{name!r} holds {bad} non-finite value{"s" if bad > 1 else ""} (NaN/inf) among its '
                        f'{a.size} elements')
  if problems:
    more = f'; and {len(problems) - 5} more' if len(problems) > 5 else ''
    raise CheckpointMismatchError(f'{what}: bad weights: ' + '; '.join(problems[:5]) + more)


def import_state_dict(sd: Mapping[str, Any], table: Sequence[Entry], what: str = 'checkpoint',
                      skip: Sequence[str] = (), allow_cast: bool = False) -> Dict[str, Any]:
  """Reference state_dict -> our variables ({collection: tree}) of numpy float32 arrays (views where possible).

  Shapes checked (``check_state_dict``), then values (``validate_tensors``: floating, finite; ``allow_cast`` see
  there). Derived buffers and aliases are checked, not stored; collections in ``skip`` are left out.
  """
  check_state_dict(sd, table, what)
  sd = validate_tensors(sd, table, what, allow_cast)
  flat: Dict[str, Dict[Tuple[str, ...], Array]] = collections.defaultdict(dict)
  for e in table:
    if e.key not in sd:
      continue                              # optional
    a = sd[e.key]
    if e.collection is None:
      _check_buffer(e, np.asarray(a), what)
      continue
    if e.alias_of is not None:
      primary = sd[e.alias_of]
      if primary is not a and not np.array_equal(np.asarray(primary), np.asarray(a)):
        raise CheckpointMismatchError(f'{what}: {e.key!r} differs from {e.alias_of!r}; they are one module in the '
                                      f'reference and must hold the same tensor')
      continue
    if e.collection in skip:
      continue
    a = np.asarray(a)
    if e.resettable and a.shape != e.shape:
      logging.warning('%s: %s has %d rows, the model %d; it is reset to zeros', what, e.key, a.shape[0], e.shape[0])
      a = np.zeros(e.shape, np.float32)
    flat[e.collection][e.path] = e.from_torch(np.asarray(a, np.float32))   # views; no copy of big tensors
  return {col: traverse_util.unflatten_dict(d) for col, d in flat.items()}


def export_state_dict(variables: Mapping[str, Any], table: Sequence[Entry], what: str = 'model',
                      zeros_for: Sequence[str] = (), omit: Sequence[str] = ()
                      ) -> 'collections.OrderedDict[str, Array]':
  """Our variables -> reference state_dict (numpy), every key, shape and buffer of the reference, in its order.

  A tensor missing from ``variables`` is an error, except in the collections ``zeros_for`` (written as zeros) and
  ``omit`` (left out). An alias holds the very same array object as its primary.
  """
  flat = {col: traverse_util.flatten_dict(meta.unbox(v)) for col, v in variables.items()}
  out = collections.OrderedDict()
  for e in table:
    if e.collection is None:
      a = e.value()
    elif e.alias_of is not None:
      a = out[e.alias_of]
    elif e.collection in flat and e.path in flat[e.collection]:
      a = e.to_torch(np.asarray(flat[e.collection][e.path], dtype=np.float32))
    elif e.collection in zeros_for:
      a = np.zeros(e.shape, np.float32)
    elif e.collection in omit:
      continue
    else:
      raise CheckpointMismatchError(f'{what}: no parameter at {"/".join(e.path)} for {e.key!r}')
    if tuple(a.shape) != e.shape:
      raise CheckpointMismatchError(f'{what}: {e.key!r} would have shape {tuple(a.shape)}, expected {e.shape}')
    out[e.key] = np.asarray(a, e.dtype)   # made contiguous when written (save_state_dict)
  return out


# ----------------------------------------------------------------------------- files
def _short_cause(e: BaseException) -> str:
  """One line of a reader's exception: torch's unpickler advice and miniz's internals trimmed to the cause."""
  msg = str(e)
  cause = re.search(r'WeightsUnpickler error:\s*(.*?)(?:\n\n|$)', msg, re.S)
  msg = ' '.join((cause.group(1) if cause else msg.strip().split('\n', 1)[0]).split())
  msg = msg.split('. This is an internal miniz error')[0]
  msg = re.sub(r'^\[enforce fail at [^\]]*\]\s*\.?\s*', '', msg)
  if 'failed finding central directory' in msg:
    msg = 'truncated or not a zip archive: ' + msg
  if len(msg) > 200:
    msg = msg[:197] + '...'
  return f'{type(e).__name__}: {msg}' if msg else type(e).__name__


def check_checkpoint_file(path, what: str = 'checkpoint') -> str:
  """``path`` names a non-empty regular file, else ``FileNotFoundError`` / ``CheckpointFileError`` saying why."""
  from var_jax import fileio
  path = os.fspath(path)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{what} file not found: {path}')
  if fileio.isdir(path):
    raise CheckpointFileError(f'{what} {path}: is a directory, not a weights file')
  if (fileio.path(path).stat().length if fileio.is_remote(path) else os.path.getsize(path)) == 0:
    raise CheckpointFileError(f'{what} {path}: the file is empty (0 bytes)')
  return path


def _remote(read, path: str, *args):
  """``read(local copy of the remote file path, *args)``; errors name ``path``, not the copy."""
  from var_jax import fileio
  with fileio.local_file(path) as local:     # the readers need a real file (mmap, zip headers)
    try:
      return read(local, *args)
    except CheckpointFileError as e:
      raise CheckpointFileError(str(e).replace(local, path)) from None


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('reading .pth/.pt/.th files needs torch: pip install "var_jax[torch]" (or use .safetensors)'
                      ) from e
  return torch


def _read_torch(path: str, what: str, wrapper_key: Optional[str], mmap: bool):
  """The mapping of tensors in a torch file (``weights_only``: no code runs), unwrapped from ``wrapper_key``."""
  import zipfile
  torch = _torch()
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
  except Exception as e:  # noqa: BLE001 - any reader failure is "not a loadable checkpoint"
    raise CheckpointFileError(f'{what} {path}: not a loadable weights-only torch checkpoint ({_short_cause(e)})'
                              ) from None
  if isinstance(obj, Mapping) and wrapper_key in obj and isinstance(obj[wrapper_key], Mapping):
    obj = obj[wrapper_key]
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f'{what} {path}: expected a state_dict (mapping of tensors), found {type(obj).__name__}')
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    # trainer checkpoints of the reference wrap the state dicts: {'trainer': {'var_wo_ddp': ..., 'vae_local': ...}}
    wrapped = f' or {{{wrapper_key!r}: state_dict}}' if wrapper_key is not None else ''
    raise CheckpointFileError(f'{what} {path}: expected a flat state_dict of tensors{wrapped}; found top-level keys '
                              f'{sorted(map(str, obj))[:10]} (extract the model state_dict first)')
  return obj


def _safetensors_call(path: str, what: str, fn):
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, a bad header's JSON error ...
    raise CheckpointFileError(f'{what} {path}: not a readable .safetensors file ({_short_cause(e)})') from None


def load_state_dict(path, wrapper_key: Optional[str] = None, what: str = 'checkpoint') -> StateDict:
  """Read a ``.pth``/``.pt``/``.th`` (torch, ``weights_only=True``) or ``.safetensors`` state_dict into numpy: the
  one reader of reference-layout files of every family, local or remote (``gs://``: through a temporary copy). A missing path is ``FileNotFoundError``; a directory, an
  empty, truncated or random file, a zip that is no torch file, a bad safetensors header or a file that holds no
  flat state_dict is one ``CheckpointFileError`` line naming the file (``what``: e.g. 'BAE checkpoint') and why.
  The values are checked at import (``validate_tensors``).

  ``wrapper_key``: a torch file may hold ``{wrapper_key: state_dict}`` (BiGR's ``{'ema': ...}``); a plain state_dict
  is accepted too. Tensors that share storage in the file come back as the same numpy array; bfloat16 tensors come
  back as float32 (numpy has no bfloat16).
  """
  path = check_checkpoint_file(path, what)
  if '://' in path:
    return _remote(load_state_dict, path, wrapper_key, what)
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return _safetensors_call(path, what, lambda: dict(load_file(path)))
  torch = _torch()
  obj = _read_torch(path, what, wrapper_key, mmap=False)
  out, seen = {}, {}
  for key, v in obj.items():
    ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
    if ident in seen:
      out[key] = out[seen[ident]]
    else:
      seen[ident] = key
      v = v.detach().cpu()
      out[key] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def state_dict_keys(path, wrapper_key: Optional[str] = None, what: str = 'checkpoint') -> List[str]:
  """The keys of a state_dict file (``load_state_dict``'s formats and errors) without reading the tensors' data:
  the safetensors header, or a memory-mapped torch load."""
  path = check_checkpoint_file(path, what)
  if '://' in path:
    return _remote(state_dict_keys, path, wrapper_key, what)
  if path.endswith('.safetensors'):
    from safetensors import safe_open

    def keys():
      with safe_open(path, 'numpy') as f:
        return list(f.keys())
    return _safetensors_call(path, what, keys)
  return [str(k) for k in _read_torch(path, what, wrapper_key, mmap=True)]


def save_state_dict(sd: Mapping[str, Array], path, wrapper_key: Optional[str] = None):
  """Write a state_dict as ``.pth`` (torch.save of CPU tensors; ``{wrapper_key: sd}`` if given) or ``.safetensors``.

  Keys that hold the same numpy array share one torch tensor, so the file stores it once. Written atomically
  (``var_jax.fileio``): a failed write never leaves a half-written checkpoint behind, nor replaces a good one.
  """
  from var_jax import fileio
  path = os.fspath(path)
  if not fileio.is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save
    fileio.atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in sd.items()}))
    return
  try:
    import torch
  except ImportError as e:  # pragma: no cover
    raise ImportError(f'writing {path} needs torch: pip install "var_jax[torch]" (or use .safetensors)') from e
  tensors, by_id = collections.OrderedDict(), {}
  for k, v in sd.items():
    if id(v) not in by_id:
      by_id[id(v)] = torch.from_numpy(np.require(v, requirements=['C', 'W']))
    tensors[k] = by_id[id(v)]
  fileio.atomic_save(path, lambda f: torch.save({wrapper_key: tensors} if wrapper_key is not None else tensors, f))
