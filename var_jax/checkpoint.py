"""Checkpoint I/O (orbax): the one place that reads and writes our own checkpoints.

A model checkpoint directory holds
  ``config.json``   {'vae': VQVAEConfig fields, 'var': VARConfig fields}
  ``params/``       an orbax StandardCheckpointer tree {'vae': vae variables, 'var': var variables}
Local or remote (``gs://``, through ``var_jax.fileio`` and orbax). Local writes go to a temporary sibling directory
that is renamed into place when complete, so an interrupted save never leaves a half-written checkpoint where a good
one was; remote ones write ``config.json`` last (see ``save_model``).
"""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import shutil
from typing import Any, Dict, Tuple

import jax
import numpy as np

from var_jax import fileio
from var_jax.models.var_config import VARConfig, VQVAEConfig

_log = std_logging.getLogger('var_jax.checkpoint')
CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


def _configs_to_json(vae_config: VQVAEConfig, var_config: VARConfig) -> str:
  return json.dumps({'vae': dataclasses.asdict(vae_config), 'var': dataclasses.asdict(var_config)}, indent=1)


def configs_from_json(text: str, where: str = 'config.json') -> Tuple[VQVAEConfig, VARConfig]:
  try:
    d = json.loads(text)
  except ValueError as e:
    raise ValueError(f'{where}: not valid JSON ({e})') from None
  if not isinstance(d, dict):
    raise ValueError(f'{where}: expected a JSON object with \'vae\' and \'var\' sections')
  out = []
  for key, cls in (('vae', VQVAEConfig), ('var', VARConfig)):
    if key not in d:
      raise ValueError(f'{where}: missing section {key!r}')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d[key]) - known)
    if unknown:
      raise ValueError(f'{where}: unknown {key} config fields {unknown}')
    out.append(cls(**d[key]))
  return out[0], out[1]


def _process_local_checkpointer():
  """A StandardCheckpointer that involves only this process (no cross-process barriers): model files are written by
  one process and read by each on its own, whatever the process count."""
  import orbax.checkpoint as ocp
  if jax.process_count() == 1:
    return ocp.StandardCheckpointer()
  i = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=i, active_processes={i}, barrier_sync_key_prefix=f'model_p{i}'))


def save_model(path: str, vae_config: VQVAEConfig, var_config: VARConfig, vae_variables, var_variables):
  """Write a model checkpoint directory (see module doc) from host arrays; with several processes, call it on one.
  Refuses to overwrite a non-checkpoint directory. Local: written beside, then renamed into place. Remote
  (``gs://``, no directory rename there): an earlier model is removed, ``params/`` written, ``config.json`` last, so
  a directory cut short is never taken for a model (``_is_model_dir`` needs both)."""
  path = fileio.abspath(path)
  if fileio.exists(path) and not fileio.exists(os.path.join(path, CONFIG_FILE)):
    raise FileExistsError(f'{path} exists and is not a var_jax model checkpoint; refusing to overwrite it')
  remote = fileio.is_remote(path)
  tmp = path if remote else path + '.tmp-save'
  fileio.rmtree(tmp)
  fileio.makedirs(tmp)
  ckptr = _process_local_checkpointer()
  ckptr.save(os.path.join(tmp, PARAMS_DIR), {'vae': vae_variables, 'var': var_variables})
  ckptr.wait_until_finished()
  fileio.atomic_write_text(os.path.join(tmp, CONFIG_FILE), _configs_to_json(vae_config, var_config))
  if remote:
    return
  if os.path.exists(path):
    old = path + '.tmp-old'
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)


def _is_model_dir(path: str) -> bool:
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not (fileio.isfile(cfg_file) and fileio.isdir(os.path.join(path, PARAMS_DIR))):
    return False
  try:
    d = json.loads(fileio.path(cfg_file).read_text())
  except ValueError:
    return False
  return isinstance(d, dict) and {'vae', 'var'} <= set(d)


def resolve_model_dir(path: str) -> str:
  """``path`` when it is a model checkpoint directory; a training workdir (``checkpoints/``, a training
  ``config.json``) gives its exported ``model/``; else an error saying what ``path`` is. Local or remote."""
  path = fileio.abspath(path)
  if _is_model_dir(path):
    return path
  model = os.path.join(path, 'model')
  if _is_model_dir(model):
    from absl import logging
    logging.info('%s is a training workdir: loading its exported model %s', path, model)
    return model
  if fileio.isdir(os.path.join(path, PARAMS_DIR)) and fileio.isfile(os.path.join(path, CONFIG_FILE)):
    return path          # a damaged model directory: configs_from_json names what is wrong
  if fileio.isdir(os.path.join(path, 'checkpoints')):
    raise FileNotFoundError(f'{path} is a training workdir without an exported model ({model} is missing: the run '
                            f'has not finished, or it trains a tokenizer); a VAR model is exported to '
                            f'<workdir>/model when training completes')
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path}: no such model checkpoint directory')
  raise FileNotFoundError(f'{path} is not a var_jax model checkpoint (expected {CONFIG_FILE} with \'vae\' and '
                          f'\'var\' sections and {PARAMS_DIR}/, or a training workdir holding model/)')


def load_model(path: str) -> Tuple[VQVAEConfig, VARConfig, Dict[str, Any], Dict[str, Any]]:
  """Read a model checkpoint directory (or a training workdir's ``model/``, ``resolve_model_dir``) ->
  (vae_config, var_config, vae_variables, var_variables), on the host."""
  path = resolve_model_dir(path)
  cfg_file = os.path.join(path, CONFIG_FILE)
  vae_cfg, var_cfg = configs_from_json(fileio.path(cfg_file).read_text(), cfg_file)
  from var_jax.interop.state_dict import CheckpointFileError, validate_arrays
  try:
    tree = _process_local_checkpointer().restore(os.path.join(path, PARAMS_DIR))
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors of a damaged params/ directory
    msg = ' '.join(str(e).split())
    raise CheckpointFileError(f'{path}: {PARAMS_DIR}/ cannot be restored (damaged or incomplete checkpoint: '
                              f'{type(e).__name__}: {msg[:200]})') from None
  tree = jax.tree.map(np.asarray, tree)
  for key in ('vae', 'var'):
    if key not in tree:
      raise ValueError(f'{path}: the params tree has no {key!r} entry')
  validate_arrays({'/'.join(str(getattr(k, 'key', k)) for k in kp): a
                   for kp, a in jax.tree_util.tree_flatten_with_path(tree)[0]}, path)
  return vae_cfg, var_cfg, tree['vae'], tree['var']


class TrainCheckpointer:
  """Training checkpoints in ``<workdir>/checkpoints``: the train state (sharded arrays), the data iterator's
  state (one file per process, via grain) and the config, saved asynchronously every ``every`` steps, the last
  ``keep`` kept. Works on local paths and gs://.

  A run directory that went wrong is handled here: unfinished saves of a killed run (``<step>.orbax-checkpoint-tmp-*``)
  are removed at start, with a warning; ``damage(step)`` says why a step cannot be restored (read the same way on
  every process, from the shared files); ``set_aside(step)`` renames a damaged step to ``<step>.damaged-<time>``
  (kept for inspection, out of orbax's way); a failed save (a full or read-only disk) is one ``WorkdirError`` naming
  the step and the last good checkpoint, which the failed save did not touch (orbax writes into a temporary
  directory renamed on completion); ``restore`` re-splits the data iterator states of a run saved on another process
  count where the global data order allows it (``_resplit_data_states``)."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = str(directory)
    self.every = max(int(every), 1)
    self._warn_unfinished()
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep > 0 else None, create=True,
                                        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    import grain
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)
    self._pending = None         # the step of the last asynchronous save, until it is known to have completed

  def _warn_unfinished(self):
    if jax.process_index() != 0 or not fileio.isdir(self.directory):
      return
    tmp = sorted(p.name for p in fileio.path(self.directory).iterdir() if '.orbax-checkpoint-tmp' in p.name)
    if tmp:
      _log.warning('%s: removing %d unfinished checkpoint save(s) of an earlier run (killed while saving): %s',
                      self.directory, len(tmp), ', '.join(tmp))

  def all_steps(self):
    """The saved steps, newest first."""
    return sorted(self.manager.all_steps(), reverse=True)

  def latest_step(self):
    return self.manager.latest_step()

  def state_metadata(self, step: int):
    md = self.manager.item_metadata(step)
    tree = md['state'] if isinstance(md, dict) or hasattr(md, '__getitem__') else md.state
    return getattr(tree, 'tree', tree)

  def saved_config(self, step: int) -> Dict[str, Any]:
    """The config saved with checkpoint ``step`` (a plain dict)."""
    ocp = self._ocp
    return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config'])

  # ------------------------------------------------------------------- damage
  def damage(self, step: int):
    """Why checkpoint ``step`` cannot be restored (its files are missing, empty or unreadable), or None when its
    structure is whole. Only reads files, the same on every process; the array data itself is read by restore."""
    d = fileio.path(self.directory) / str(step)
    if not d.is_dir() or not any(d.iterdir()):
      return 'empty directory'
    for name, what in (('_CHECKPOINT_METADATA', 'orbax writes it before a save completes'),
                       ('state/_METADATA', 'the tree of the train state'), ('config/metadata', 'the saved config')):
      f = d / name
      if name.startswith('config/') and not (d / 'config').exists():
        continue                 # the config item is optional (older checkpoints)
      if not f.exists():
        return f'{name} is missing ({what})'
      try:
        json.loads(f.read_text())
      except (ValueError, UnicodeDecodeError) as e:
        return f'{name} is not valid JSON ({e})'
    data = d / 'data'
    files = sorted(data.glob('process_*-of-*.json')) if data.is_dir() else []
    if not files:
      return 'data/ holds no data iterator state (process_<i>-of-<n>.json)'
    counts = {f.name.rsplit('-of-', 1)[1][:-len('.json')] for f in files}
    if len(counts) != 1 or not counts.pop().isdigit():
      return f'data/ holds iterator states of several process counts ({", ".join(f.name for f in files)})'
    n = int(files[0].name.rsplit('-of-', 1)[1][:-len('.json')])
    for i in range(n):
      f = data / f'process_{i}-of-{n}.json'
      if not f.exists():
        return f'data/{f.name} is missing'
      try:
        json.loads(f.read_text())
      except (ValueError, UnicodeDecodeError) as e:
        return f'data/{f.name} is not valid JSON ({e})'
    return None

  def set_aside(self, step: int) -> str:
    """Rename damaged checkpoint ``step`` to ``<step>.damaged-<UTC time>`` (process 0; every process waits), so the
    run can save that step again. -> the new path."""
    import time
    now = int(time.time())
    if jax.process_count() > 1:    # one name on every process
      from jax.experimental import multihost_utils
      now = int(multihost_utils.broadcast_one_to_all(np.int64(now)))
    d = fileio.path(self.directory)
    base = f'{step}.damaged-{time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))}'
    new, n = d / base, 1
    while new.exists():
      n += 1
      new = d / f'{base}-{n}'
    _sync(f'var_jax_set_aside_name_{step}')       # every process chose the name before process 0 renames
    if jax.process_index() == 0:
      (d / str(step)).rename(new)
    _sync(f'var_jax_set_aside_{step}')
    self.manager.reload()
    return str(new)

  # ------------------------------------------------------------------- save
  def due(self, step: int, force: bool = False) -> bool:
    """Whether ``maybe_save(step, ..., force)`` writes a checkpoint."""
    return (force or step % self.every == 0) and self.manager.latest_step() != step

  def _save_failed(self, step: int, e: BaseException):
    from var_jax.train import errors
    self._pending = None
    self.manager.reload()
    good = [s for s in self.all_steps() if s != step]
    last = f'the last complete checkpoint is {self.directory}/{good[0]}' if good else 'no checkpoint was saved'
    return errors.WorkdirError(f'saving checkpoint {step} to {self.directory} failed: {type(e).__name__}: {e}; '
                               f'{last} (untouched). Free space or fix the directory, then run again to resume')

  def maybe_save(self, step: int, state, data_iter, config, force: bool = False, inputs=None):
    """Save ``step`` when due; the config item is ``config`` plus ``inputs`` (the run's frozen inputs'
    fingerprints, ``var_jax.train.identity``) under ``identity.RECORD_KEY``."""
    if not self.due(step, force):
      return False
    import grain
    ocp = self._ocp
    saved_config = json.loads(config.to_json_best_effort())
    if inputs is not None:
      from var_jax.train import identity
      saved_config[identity.RECORD_KEY] = inputs
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              config=ocp.args.JsonSave(saved_config))
    self.wait()               # the previous save's asynchronous part (orbax would wait here too): its errors
    try:
      saved = self.manager.save(step, args=args, force=True)
    except OSError as e:
      raise self._save_failed(step, e) from e
    self._pending = step
    return saved

  def restore(self, step: int, abstract_state, shardings, data_iter, global_batch_size=None):
    """The state of checkpoint ``step`` on ``shardings`` (re-sharded by orbax for another mesh), ``data_iter`` set to
    its position. A checkpoint of another process count: the saved iterator states are re-split
    (``_resplit_data_states``, needs ``global_batch_size``) or a ``ResumeError`` says what to do."""
    import grain
    ocp = self._ocp
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    data_dir = fileio.path(self.directory) / str(step) / 'data'
    mine = data_dir / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    items = {'state': ocp.args.StandardRestore(target)}
    if mine.exists():
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
      saved = [json.loads(f.read_text()) for f in sorted(data_dir.glob('process_*-of-*.json'),
                                                         key=lambda f: int(f.name.split('_')[1].split('-')[0]))]
      state = _resplit_data_states(saved, jax.process_count(), global_batch_size, f'{self.directory}/{step}')
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except KeyError as e:   # grain: the iterator state of another pipeline layout (e.g. 'exhausted')
      from var_jax.train import errors
      raise errors.ResumeError(
          f'checkpoint {step}: the data iterator state does not fit this data pipeline (KeyError {e}); it was saved '
          f'with other data settings, most often another data.num_workers (the saved config is in the '
          f'checkpoint\'s config item)') from e
    if 'data' not in items:
      data_iter.set_state(state)
    return out['state']

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      raise self._save_failed(self._pending, e) from e
    self._pending = None

  def close(self):
    self.manager.close()


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` is True on every process (one all-gather; ``ok`` itself with one process)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(bool(ok)))))


def _resplit_data_states(saved, process_count: int, global_batch_size, where: str):
  """This process's data iterator state, from the states ``saved`` by ``len(saved)`` processes. The train stream's
  global order does not depend on the process count (``var_jax.data.pipeline``: process ``p`` of ``P`` reads the
  ``p``-th block of every global batch), so after ``E`` elements of the global stream every process of any count
  resumes at ``E / P`` of its own stream — when the saved processes all stood at the same position (no unreadable
  image skipped on one of them, no worker processes: ``data.num_workers=0``) and ``E`` is a whole number of global
  batches."""
  from var_jax.train import errors
  k = len(saved)
  how = (f'resume it with {k} process(es) (JAX_NUM_PROCESSES={k}, a slice of that size), or start a new run that '
         f'initialises from it (config.init_from)')
  simple = all(isinstance(s, dict) and set(s) == {'next_index'} and isinstance(s['next_index'], int) for s in saved)
  if not simple:
    raise errors.ResumeError(f'{where} was saved by {k} process(es), this run has {process_count}: its data iterator '
                             f'state is per data worker (data.num_workers > 0) and cannot be re-split; {how}')
  pos = {s['next_index'] for s in saved}
  if len(pos) != 1:
    raise errors.ResumeError(f'{where} was saved by {k} process(es), this run has {process_count}: the processes '
                             f'stood at different data positions ({sorted(pos)}: unreadable images were skipped), so '
                             f'their states cannot be re-split; {how}')
  total = pos.pop() * k
  if not global_batch_size or total % int(global_batch_size):
    raise errors.ResumeError(f'{where} was saved by {k} process(es), this run has {process_count}: {total} examples '
                             f'read is not a whole number of global batches of {global_batch_size}; {how}')
  _log.warning('%s was saved by %d process(es), this run has %d: the data position (%d examples) is re-split '
                  'over the processes (the global data order does not depend on the process count)', where, k,
                  process_count, total)
  return {'next_index': total // process_count}
