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
  ``keep`` kept. Works on local paths and gs://."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.every = max(int(every), 1)
    opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep > 0 else None, create=True,
                                        enable_async_checkpointing=async_save)
    import grain
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)

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

  def due(self, step: int, force: bool = False) -> bool:
    """Whether ``maybe_save(step, ..., force)`` writes a checkpoint."""
    return (force or step % self.every == 0) and self.manager.latest_step() != step

  def maybe_save(self, step: int, state, data_iter, config, force: bool = False):
    if not self.due(step, force):
      return False
    import grain
    ocp = self._ocp
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state, shardings, data_iter):
    import grain
    ocp = self._ocp
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               data=grain.checkpoint.CheckpointRestore(data_iter)))
    except KeyError as e:   # grain: the iterator state of another pipeline layout (e.g. 'exhausted')
      raise ValueError(f'checkpoint {step}: the data iterator state does not fit this data pipeline (KeyError {e}); '
                       f'it was saved with other data settings, most often another data.num_workers (the saved '
                       f'config is in the checkpoint\'s config item)') from e
    return out['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
