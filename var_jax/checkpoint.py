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

from var_jax.models.configs import VARConfig, VQVAEConfig

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


def save_model(path: str, vae_config: VQVAEConfig, var_config: VARConfig, vae_variables, var_variables):
  """Write a model checkpoint directory (see module doc). Refuses to overwrite a non-checkpoint directory."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.exists(os.path.join(path, CONFIG_FILE)):
    raise FileExistsError(f'{path} exists and is not a var_jax model checkpoint; refusing to overwrite it')
  tmp = path + '.tmp-save'
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
    f.write(_configs_to_json(vae_config, var_config))
  ckptr = ocp.StandardCheckpointer()
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
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.fspath(path))
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f'{path} is not a var_jax model checkpoint (no {CONFIG_FILE})')
  with open(cfg_file) as f:
    vae_cfg, var_cfg = configs_from_json(f.read(), cfg_file)
  tree = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
  tree = jax.tree.map(np.asarray, tree)
  for key in ('vae', 'var'):
    if key not in tree:
      raise ValueError(f'{path}: the params tree has no {key!r} entry')
  return vae_cfg, var_cfg, tree['vae'], tree['var']
