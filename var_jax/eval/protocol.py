"""Samples on disk, the way the evaluation protocol wants them: which label each image gets, one PNG per image (the
uint8 round trip), ``samples.npz`` for OpenAI's evaluator, each family's release sampling settings, and the
resumable generation loop (split over processes: image i on process i % count) that the CLIs run."""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from var_jax import fileio, progress
from var_jax.dtypes import parse_dtype
from var_jax.images import intact_image, labelled_grid, read_rgb, to_uint8, write_png
from var_jax.sampling.common import check_sampling_args, parse_class_labels

# the release settings a family samples with where a setting is left unset
FAMILY_DEFAULTS = {'var': {'cfg': 1.5, 'top_k': 900, 'top_p': 0.96}, 'elm': {'cfg': 4.0, 'top_k': 1000}, 'bigr': {}}
# the ``pipe.sample`` settings beyond cfg / top_k that a family has
FAMILY_SETTINGS = {'var': ('top_p', 'more_smooth'), 'elm': ('cfg_schedule', 'temperature', 'num_iter'),
                   'bigr': ('cfg_schedule', 'temperature', 'num_iter', 'infer_steps', 'gumbel_temp',
                            'gumbel_schedule')}


def sample_plan(num_classes: int, classes: Optional[Sequence[int]], num_per_class: int) -> List[int]:
  """The label of every image, in output order: ``classes`` (None: every class 0..num_classes-1) each
  ``num_per_class`` times. A label is an integer in [0, num_classes], ``num_classes`` being the unconditional
  class (the pipelines' rule, ``sampling.common.parse_class_labels``); an empty ``classes`` is an error."""
  check_sampling_args('--', num_per_class=num_per_class)
  labels = list(range(num_classes)) if classes is None else parse_class_labels(classes, num_classes, '--classes')
  return [c for c in labels for _ in range(num_per_class)]


def image_name(index: int, label: int) -> str:
  return f'{index:06d}_class{label:04d}.png'


def sampling_options(family: str, cfg=None, top_k=None, top_p=None, more_smooth=False, cfg_schedule=None,
                     temperature=None, num_iter=None, infer_steps=None, gumbel_temp=None,
                     gumbel_schedule=None) -> Dict[str, Any]:
  """The keyword arguments of ``pipe.sample`` for a model family; unset values take the family's defaults, and a
  setting the family does not have is an error (naming the flag)."""
  given = {'top_p': top_p, 'more_smooth': more_smooth or None, 'cfg_schedule': cfg_schedule,
           'temperature': temperature, 'num_iter': num_iter, 'infer_steps': infer_steps, 'gumbel_temp': gumbel_temp,
           'gumbel_schedule': gumbel_schedule}
  bad = [f'--{k}' for k, v in given.items() if v is not None and k not in FAMILY_SETTINGS[family]]
  if family == 'bigr' and top_k is not None:
    bad.append('--top_k')
  if bad:
    raise ValueError(f'{", ".join(bad)} do not apply to {family.upper()} models')
  opts = {**FAMILY_DEFAULTS[family], **{k: v for k, v in given.items() if v is not None}}
  if family == 'var':
    opts['more_smooth'] = bool(more_smooth)
  opts.update({k: v for k, v in (('cfg', cfg), ('top_k', top_k)) if v is not None})
  return opts


def write_npz(out_dir: str, labels: List[int]) -> str:
  """``samples.npz`` (``arr_0``: uint8 NHWC) built from the PNGs on disk (the uint8 round trip is part of the FID
  protocol): exactly what OpenAI's evaluator reads. Written atomically (``fileio``)."""
  paths = [os.path.join(out_dir, image_name(i, l)) for i, l in enumerate(labels)]
  present = set(fileio.find_files(out_dir, ('.png',)))     # one listing (local or gs://), not a call per file
  stray = _stray_pngs(out_dir, labels)
  if stray:
    logging.warning('%s: %d sample PNGs are not in its plan (e.g. %s); they are left out of samples.npz', out_dir,
                    len(stray), stray[0])
  missing = [p for p in paths if p not in present]
  if missing:
    raise FileNotFoundError(f'{out_dir}: {len(missing)} of {len(paths)} samples are missing (first: {missing[0]}); '
                            f'rerun the sampling to complete the set')
  arrays = []
  for p in paths:
    try:
      arrays.append(read_rgb(p))
    except OSError as e:
      raise ValueError(f'{p}: damaged sample image ({e}); rerun the sampling to regenerate it') from None
    if arrays[-1].shape != arrays[0].shape:
      raise ValueError(f'{p}: a {arrays[-1].shape[1]}x{arrays[-1].shape[0]} image among '
                       f'{arrays[0].shape[1]}x{arrays[0].shape[0]} samples (left from another model?); remove it')
  path = os.path.join(out_dir, 'samples.npz')
  fileio.atomic_save(path, lambda f: np.savez(f, arr_0=np.stack(arrays)))
  return path


def check_destinations(out: Optional[str], out_dir: Optional[str]):
  """The sampling outputs, before any model is loaded or image sampled: at least one given, ``out`` a writable
  ``.png`` file path (not a directory), ``out_dir`` a writable directory (made if missing). Raises
  ``ValueError`` / ``fileio.OutputError`` naming the flag."""
  if not out and not out_dir:
    raise ValueError('give --out (a grid PNG) and/or --out_dir (one PNG per image + npz)')
  if out:
    fileio.check_output_file(out, '--out', suffixes=('.png',))
  if out_dir:
    fileio.check_output_dir(out_dir, '--out_dir')


def _existing_samples(out_dir: str, names: Dict[int, str]) -> set:
  """The indices whose PNG in ``out_dir`` is intact (fully decodes). A damaged one (truncated by a kill during a
  write without the atomic writer, or corrupt) and temporary files left beside an image are removed with a warning
  naming them, so the image is sampled again."""
  intact = set()
  stray = {}
  listing = set(fileio.listdir(out_dir))    # one listing (local or gs://: [] for an empty remote directory)
  for f in listing:
    for suffix in ('.tmp.png',):                      # the former writer's temporary name
      if f.endswith(suffix):
        stray.setdefault(f[:-len(suffix)], []).append(f)
    if f.startswith('.') and '.png.tmp-' in f:         # fileio.atomic_open's temporary name
      stray.setdefault(f[1:f.index('.png.tmp-') + 4], []).append(f)
  mine = set(names.values())
  for target, files in stray.items():
    if target in mine:
      for f in files:
        logging.warning('%s: removing the stray temporary file %s (an interrupted write)', out_dir, f)
        with contextlib.suppress(OSError):
          fileio.path(os.path.join(out_dir, f)).unlink()
  for i, name in names.items():
    p = os.path.join(out_dir, name)
    if name not in listing:
      continue
    if intact_image(p):
      intact.add(i)
    else:
      logging.warning('%s is damaged (truncated or not a readable PNG): it is sampled again', p)
      with contextlib.suppress(OSError):
        fileio.path(p).unlink()
  return intact


# ----------------------------------------------------------------------------- a sample folder's identity
PLAN_FILE = 'sample_plan.json'
PLAN_VERSION = 1
_SAMPLE_NAME = re.compile(r'^(\d{6})_class(\d{4,})\.png$')       # image_name's pattern


def _jsonable(x):
  """``x`` as JSON gives it back (tuples -> lists, numpy scalars -> Python, anything else -> its str), so a
  recorded plan and a new one compare equal exactly when they are the same."""
  return json.loads(json.dumps(x, sort_keys=True, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _label_runs(labels: Sequence[int]) -> List[List[int]]:
  """[[label, count], ...] of consecutive equal labels (a plan of 50 x 1000 classes is 1000 pairs)."""
  runs: List[List[int]] = []
  for l in labels:
    if runs and runs[-1][0] == int(l):
      runs[-1][1] += 1
    else:
      runs.append([int(l), 1])
  return runs


def _model_identity(pipe) -> Dict[str, Any]:
  ident = getattr(pipe, 'identity', None)
  return ident() if callable(ident) else {'family': getattr(pipe, 'family', type(pipe).__name__)}


def _image_size(pipe) -> Optional[int]:
  size = getattr(pipe, 'image_size', None)
  if size is None:
    size = getattr(getattr(pipe, 'vae_config', None), 'image_size', None)
  return None if size is None else int(size)


def folder_plan(pipe, labels: Sequence[int], seed: int, opts: Dict[str, Any], dtype: str) -> Dict[str, Any]:
  """What decides the images of a sample folder: the model (``pipe.identity()``: family, configs, a fingerprint of
  the weights), the image size, every setting ``pipe.sample`` gets (``opts``, whatever keys a family has), the
  seed, the compute dtype and every image's label. Not the batch size, the device or process count (the images do
  not depend on them)."""
  return _jsonable({'plan_version': PLAN_VERSION, 'model': _model_identity(pipe), 'image_size': _image_size(pipe),
                    'sampling': dict(opts), 'seed': int(seed), 'dtype': _dtype_name(dtype), 'labels': _label_runs(labels)})


def _dtype_name(dtype) -> str:
  import jax.numpy as jnp
  return jnp.dtype(parse_dtype(dtype, '--dtype')).name


def read_plan(out_dir: str) -> Optional[Dict[str, Any]]:
  """The plan recorded in ``out_dir`` (None if there is none); an unreadable one is an error naming it."""
  path = os.path.join(out_dir, PLAN_FILE)
  if not fileio.isfile(path):
    return None
  try:
    plan = json.loads(fileio.path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a readable sample plan ({e}); rerun with --overwrite to start the folder over') \
        from None
  if not isinstance(plan, dict) or 'labels' not in plan:
    raise ValueError(f'{path}: not a sample plan (no labels); rerun with --overwrite to start the folder over')
  return plan


def _classes_text(classes: List[int]) -> str:
  if len(classes) > 2 and classes == list(range(classes[0], classes[0] + len(classes))):
    return f'{classes[0]}..{classes[-1]}'
  text = ','.join(map(str, classes[:8]))
  return text + (f',... ({len(classes)} classes)' if len(classes) > 8 else '')


def _labels_diff(old, new) -> List[str]:
  """The difference of two label plans in the CLI's terms (--classes, --num_per_class) where they are of that form
  (each class the same number of times), else in images."""
  if old == new:
    return []
  counts = ({n for _, n in old}, {n for _, n in new})
  if all(len(c) == 1 for c in counts):
    out = []
    oc, nc = [c for c, _ in old], [c for c, _ in new]
    if oc != nc:
      out.append(f'classes: {_classes_text(oc)} -> {_classes_text(nc)}')
    if counts[0] != counts[1]:
      out.append(f'num_per_class: {counts[0].pop()} -> {counts[1].pop()}')
    return out
  return [f'labels: {sum(n for _, n in old)} images ({len(old)} runs) -> {sum(n for _, n in new)} images '
          f'({len(new)} runs)']


def _short(v) -> str:
  text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
  if isinstance(v, str) and v.startswith('sha256:'):
    return v[:19]
  return text if len(text) <= 60 else text[:57] + '...'


def plan_differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = '') -> List[str]:
  """``key: old -> new`` for every leaf that differs (nested keys dotted; a key on one side only: ``(none)``)."""
  out = []
  for k in sorted(set(old) | set(new), key=lambda k: (k != 'model', k)):
    a, b = old.get(k, '(none)'), new.get(k, '(none)')
    if a == b:
      continue
    if k == 'labels' and not prefix:
      out += _labels_diff(a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
      out += plan_differences(a, b, f'{prefix}{k}.')
    else:
      out.append(f'{prefix}{k}: {_short(a)} -> {_short(b)}')
  return out


def _sample_pngs(out_dir: str) -> List[str]:
  return sorted(f for f in fileio.listdir(out_dir) if _SAMPLE_NAME.match(f))


def _refuse(out_dir: str, diffs: List[str]):
  shown = '; '.join(diffs[:4]) + (f'; and {len(diffs) - 4} more' if len(diffs) > 4 else '')
  raise ValueError(f'--out_dir {out_dir} holds samples of another plan ({shown}); rerun with the same settings to '
                   f'resume, use another --out_dir, or add --overwrite to delete its samples and start over')


def _check_unplanned(out_dir: str):
  """A folder with sample PNGs and no plan (an older var_jax, or a copy): what they were drawn with is unknown."""
  pngs = _sample_pngs(out_dir) if fileio.isdir(out_dir) else []
  if pngs:
    raise ValueError(f'--out_dir {out_dir} holds {len(pngs)} sample PNGs (e.g. {pngs[0]}) but no {PLAN_FILE}: what '
                     f'they were sampled with is unknown; use another --out_dir, or add --overwrite to delete them '
                     f'and start over')


def check_folder_request(out_dir: Optional[str], *, seed: int, dtype: str, classes: Optional[Sequence],
                         num_per_class: int, settings: Dict[str, Any], overwrite: bool = False):
  """Before any model is loaded: the part of ``out_dir``'s plan that the command line decides alone (seed, dtype,
  --classes, --num_per_class, every sampling setting given, ``settings`` with None for unset) against the plan
  recorded there; a difference is one error naming it. What needs the model (its weights, a family's default
  settings, "every class") is checked by ``generate_samples`` once it is loaded, before any image is sampled."""
  if not out_dir or overwrite or not fileio.isdir(out_dir):
    return
  old = read_plan(out_dir)
  if old is None:
    _check_unplanned(out_dir)
    return
  given = {'seed': int(seed), 'dtype': _dtype_name(dtype)}
  recorded_sampling = old.get('sampling') or {}
  given['sampling'] = _jsonable({k: v for k, v in settings.items() if v is not None and k in recorded_sampling})
  diffs = plan_differences({k: old.get(k) if k != 'sampling' else {s: recorded_sampling[s]
                                                                   for s in given['sampling']} for k in given}, given)
  n = int(num_per_class)
  if classes is not None:
    labels = [c for c in parse_class_labels(classes, None, '--classes') for _ in range(n)]
    diffs += _labels_diff(old['labels'], _label_runs(labels))
  else:
    counts = {c for _, c in old['labels']}
    if counts != {n}:
      diffs.append(f'num_per_class: {counts.pop() if len(counts) == 1 else "mixed"} -> {n}')
  if diffs:
    _refuse(out_dir, diffs)


def _delete_samples(out_dir: str):
  """What a sampling run wrote in ``out_dir`` — its plan first (so an interrupted deletion leaves PNGs without a
  plan, which are refused, never taken for the next plan's), then the sample PNGs, their temporary files and
  ``samples.npz`` — and nothing else."""
  plan_path = os.path.join(out_dir, PLAN_FILE)
  if fileio.isfile(plan_path):
    fileio.path(plan_path).unlink()
  removed = 0
  for f in fileio.listdir(out_dir):
    tmp_of = f[1:f.index('.tmp-')] if f.startswith('.') and '.tmp-' in f else None    # fileio's temporary names
    target = tmp_of or (f[:-len('.tmp.png')] if f.endswith('.tmp.png') else f)
    if _SAMPLE_NAME.match(target) or target == 'samples.npz':
      with contextlib.suppress(FileNotFoundError):
        fileio.path(os.path.join(out_dir, f)).unlink()
      removed += 1
  if removed:
    logging.warning('%s: --overwrite: deleted %d files of the earlier samples', out_dir, removed)


def prepare_folder(out_dir: str, plan: Dict[str, Any], overwrite: bool = False, write: bool = True):
  """``out_dir`` ready for ``plan``, before any image is sampled: with a recorded plan, the same one (else one
  error naming the differences, nothing changed); without one, no sample PNGs of unknown origin there; then
  ``plan`` recorded (``write``; False: only check, as the other processes of a job do). ``overwrite`` (with
  ``write``): first delete what an earlier sampling run wrote there (``_delete_samples``); without ``write`` it
  checks nothing (process 0 starts over)."""
  fileio.makedirs(out_dir)
  if overwrite:
    if not write:
      return
    _delete_samples(out_dir)
  old = read_plan(out_dir)
  if old is not None:
    diffs = plan_differences(old, plan)
    if diffs:
      _refuse(out_dir, diffs)
    return
  _check_unplanned(out_dir)
  if write:
    fileio.atomic_write_text(os.path.join(out_dir, PLAN_FILE), json.dumps(plan, indent=1, sort_keys=True))


def _prepare_folder_all(out_dir: str, plan: Dict[str, Any], overwrite: bool):
  """``prepare_folder`` in a job of several processes: every process checks the recorded plan (all refuse alike,
  nothing changed), process 0 starts over (``overwrite``) and records it, then every process checks it (a process
  holding another model refuses)."""
  import jax
  from var_jax import distributed
  if jax.process_count() == 1:
    return prepare_folder(out_dir, plan, overwrite)
  prepare_folder(out_dir, plan, overwrite, write=False)
  distributed.barrier('var_jax.eval.protocol: plan checked')
  if jax.process_index() == 0:
    prepare_folder(out_dir, plan, overwrite)
  distributed.barrier('var_jax.eval.protocol: plan written')
  if jax.process_index() != 0:
    prepare_folder(out_dir, plan)


def _stray_pngs(out_dir: str, labels: List[int]) -> List[str]:
  mine = {image_name(i, l) for i, l in enumerate(labels)}
  return [f for f in _sample_pngs(out_dir) if f not in mine]


def _sample_share(pipe, labels: List[int], seed: int, opts: Dict[str, Any], batch_size: int, dtype: str,
                  out_dir: Optional[str], keep: bool, shard_index: int, shard_count: int, log=print
                  ) -> Tuple[int, Dict[int, np.ndarray]]:
  """Sample images ``i % shard_count == shard_index`` not yet in ``out_dir`` (PNGs written as they come). Returns
  (number of new images, {i: uint8 image} of the new ones if ``keep``)."""
  jdtype = parse_dtype(dtype, '--dtype')
  todo = list(range(shard_index, len(labels), shard_count))
  if out_dir:
    fileio.makedirs(out_dir)
    n_mine = len(todo)
    done = _existing_samples(out_dir, {i: image_name(i, labels[i]) for i in todo})
    todo = [i for i in todo if i not in done]
    if len(todo) < n_mine:
      log(f'{out_dir}: {n_mine - len(todo)} of {n_mine} images exist already; sampling the other {len(todo)}')
  kept = {}
  with progress.Progress(len(todo), 'sampling', unit='images') as bar:
    for start in range(0, len(todo), batch_size):
      ids = todo[start:start + batch_size]
      imgs, _ = pipe.sample([labels[i] for i in ids], seed, batch_size=batch_size, dtype=jdtype, sample_ids=ids,
                            **opts)
      for i, im in zip(ids, to_uint8(imgs)):
        if out_dir:
          write_png(os.path.join(out_dir, image_name(i, labels[i])), im)
        if keep:
          kept[i] = im
      bar.update(len(ids))
  return len(todo), kept


def _write_grid(out: str, labels: List[int], imgs: Dict[int, np.ndarray], out_dir: Optional[str], grid_cols: int):
  """The labelled grid of all ``labels``: ``imgs``, the others read back from ``out_dir``."""
  for i in range(len(labels)):
    if i not in imgs:
      imgs[i] = read_rgb(os.path.join(out_dir, image_name(i, labels[i])))
  fileio.makedirs(os.path.dirname(fileio.abspath(out)))
  write_png(out, labelled_grid(np.stack([imgs[i] for i in range(len(labels))]), labels, grid_cols))


def _gather_shares(imgs: Dict[int, np.ndarray], total: int) -> Dict[int, np.ndarray]:
  """Every process's share (image i on process i % count) on every process: an all-gather (all must call it)."""
  import jax
  from jax.experimental import multihost_utils
  count, p = jax.process_count(), jax.process_index()
  per = -(-total // count)
  shape = next(iter(imgs.values())).shape if imgs else (0, 0, 0)
  shape = tuple(int(x) for x in np.max(multihost_utils.process_allgather(np.asarray(shape, np.int32)), axis=0))
  mine = np.zeros((per,) + shape, np.uint8)
  for i, im in imgs.items():
    mine[(i - p) // count] = im
  every = np.asarray(multihost_utils.process_allgather(mine))             # (count, per, H, W, 3)
  return {i: every[i % count, i // count] for i in range(total)}


def _checked_options(pipe, out, out_dir, cfg, top_k, top_p, more_smooth, options):
  check_destinations(out, out_dir)
  return sampling_options(pipe.family, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, **(options or {}))


def _write_outputs(out, out_dir, labels, imgs, grid_cols: int, log) -> str:
  """The ``out`` grid and/or ``samples.npz`` of ``out_dir`` (one process); -> the npz path or ''."""
  path = ''
  if out:
    _write_grid(out, labels, imgs, out_dir, grid_cols)
    log(f'wrote {out} ({len(labels)} images)')
  if out_dir:
    path = write_npz(out_dir, labels)
    log(f'wrote {len(labels)} PNGs and samples.npz to {out_dir}')
  return path


def write_samples(pipe, labels: List[int], seed: int, cfg: Optional[float], top_k: Optional[int],
                  top_p: Optional[float], more_smooth: bool, batch_size: int, dtype: str, out: Optional[str] = None,
                  out_dir: Optional[str] = None, grid_cols: int = 8, shard_index: int = 0, shard_count: int = 1,
                  write_outputs: bool = True, options: Optional[Dict[str, Any]] = None,
                  overwrite: bool = False) -> int:
  """Sample ``labels`` and write the grid and/or the per-image PNGs + npz (one process; ``generate_samples``
  splits the work over processes). Returns the number of new images.

  ``cfg``/``top_k``/``top_p``/``more_smooth`` (None: the family's default) and ``options`` (ELM/BiGR settings, see
  ``sampling_options``) go to ``pipe.sample``; image i draws from fold_in(key(seed), i), so a resumed run (existing
  PNGs are skipped) draws exactly what an uninterrupted one would.

  ``shard_index``/``shard_count``: sample only images ``i % shard_count == shard_index`` (one share per process of a
  multi-host job writing to a shared folder); ``write_outputs=False`` skips the grid and npz (written once, by one
  process, after all shares are done).

  ``out_dir`` records its plan (``folder_plan``: model, settings, seed, dtype, labels) in ``sample_plan.json``; a
  folder of another plan is an error naming the difference, unless ``overwrite`` (its samples deleted first)."""
  opts = _checked_options(pipe, out, out_dir, cfg, top_k, top_p, more_smooth, options)
  if out_dir:
    prepare_folder(out_dir, folder_plan(pipe, labels, seed, opts, dtype), overwrite)
  n_new, imgs = _sample_share(pipe, labels, seed, opts, batch_size, dtype, out_dir, bool(out), shard_index,
                              shard_count)
  if write_outputs:
    _write_outputs(out, out_dir, labels, imgs, grid_cols, print)
  return n_new


def generate_samples(pipe, out_dir: Optional[str], labels: List[int], *, seed: int = 0, cfg=None, top_k=None,
                     top_p=None, more_smooth: bool = False, options: Optional[Dict[str, Any]] = None,
                     batch_size: int = 64, dtype: str = 'float32', out: Optional[str] = None, grid_cols: int = 8,
                     log=print, overwrite: bool = False) -> str:
  """The samples of ``labels`` split over processes (image i on process i % count, each on its local devices;
  keys per image, so the images are those of one process), resumable: PNGs in ``out_dir`` (shared by all
  processes), and, on process 0 once all processes are done, ``samples.npz`` and the ``out`` grid (from the PNGs,
  or all-gathered without ``out_dir``). Every process must call it. Returns the npz path on process 0, else ''.

  ``out_dir``'s identity: its ``sample_plan.json`` (``folder_plan``) is written once (process 0) and checked by
  every process before any image is sampled; another plan is one error naming the difference (``setting: old ->
  new``), unless ``overwrite`` (the earlier samples deleted, the new plan recorded)."""
  import jax
  from var_jax import distributed
  opts = _checked_options(pipe, out, out_dir, cfg, top_k, top_p, more_smooth, options)
  if out_dir:
    _prepare_folder_all(out_dir, folder_plan(pipe, labels, seed, opts, dtype), overwrite)
  p, count = jax.process_index(), jax.process_count()
  t0 = time.time()
  n_new, imgs = _sample_share(pipe, labels, seed, opts, batch_size, dtype, out_dir, bool(out), p, count, log)
  dt = time.time() - t0
  if n_new:
    log(f'generated {n_new} images in {dt:.1f}s ({n_new / dt:.2f} images/s on process {p})')
  distributed.barrier('var_jax.eval.protocol: samples written')
  if out and not out_dir and count > 1:
    imgs = _gather_shares(imgs, len(labels))
  return _write_outputs(out, out_dir, labels, imgs, grid_cols, log) if p == 0 else ''
