"""Checkpoint I/O (orbax): the one place that reads and writes our own checkpoints.

A model checkpoint directory holds
  ``config.json``   {'vae': VQVAEConfig fields, 'var': VARConfig fields}
  ``params/``       an orbax StandardCheckpointer tree {'vae': vae variables, 'var': var variables}
Writes go to a temporary sibling directory that is renamed into place when complete, so an interrupted save
never leaves a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Tuple

import jax
import numpy as np

from var_jax.models.var_config import VARConfig, VQVAEConfig

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


def _configs_to_json(vae_config: VQVAEConfig, var_config: VARConfig) -> str:
  return json.dumps({'vae': dataclasses.asdict(vae_config), 'var': dataclasses.asdict(var_config)}, indent=1)


def configs_from_json(text: str, where: str = 'config.json') -> Tuple[VQVAEConfig, VARConfig]:
  d = json.loads(text)
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
  Refuses to overwrite a non-checkpoint directory."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.exists(os.path.join(path, CONFIG_FILE)):
    raise FileExistsError(f'{path} exists and is not a var_jax model checkpoint; refusing to overwrite it')
  tmp = path + '.tmp-save'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
    f.write(_configs_to_json(vae_config, var_config))
  ckptr = _process_local_checkpointer()
  ckptr.save(os.path.join(tmp, PARAMS_DIR), {'vae': vae_variables, 'var': var_variables})
  ckptr.wait_until_finished()
  if os.path.exists(path):
    old = path + '.tmp-old'
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)


def load_model(path: str) -> Tuple[VQVAEConfig, VARConfig, Dict[str, Any], Dict[str, Any]]:
  """Read a model checkpoint directory -> (vae_config, var_config, vae_variables, var_variables), on the host."""
  path = os.path.abspath(os.fspath(path))
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f'{path} is not a var_jax model checkpoint (no {CONFIG_FILE})')
  with open(cfg_file) as f:
    vae_cfg, var_cfg = configs_from_json(f.read(), cfg_file)
  tree = _process_local_checkpointer().restore(os.path.join(path, PARAMS_DIR))
  tree = jax.tree.map(np.asarray, tree)
  for key in ('vae', 'var'):
    if key not in tree:
      raise ValueError(f'{path}: the params tree has no {key!r} entry')
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

  def maybe_save(self, step: int, state, data_iter, config, force: bool = False):
    if not force and step % self.every:
      return False
    import grain
    ocp = self._ocp
    if self.manager.latest_step() == step:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state, shardings, data_iter):
    import grain
    ocp = self._ocp
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=grain.checkpoint.CheckpointRestore(data_iter)))
    return out['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
