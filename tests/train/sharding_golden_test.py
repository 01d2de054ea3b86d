"""Golden shardings (as MaxText keeps them): the PartitionSpec of every parameter and optimizer-state leaf of a few
released models on a few meshes (8 fake CPU devices), compared with JSON files in tests/train/golden/. A change that
silently replicates a large model's weights, or shards them another way, fails here.

Only abstract shapes are built (no weights, no compilation). After an intended change, regenerate the files with
``VAR_JAX_UPDATE_GOLDENS=1 python -m pytest -q tests/train/sharding_golden_test.py`` and review the diff.
"""
import json
import os
import pathlib

import jax
import pytest

from tests_helpers import load_config
from var_jax import sharding as shd
from var_jax.train import tasks

GOLDEN = pathlib.Path(__file__).parent / 'golden'
CASES = {   # name: (config, mesh)
    'var_d16_data2_fsdp2_tensor2': ('var_d16', {'data': 2, 'fsdp': 2, 'tensor': 2}),
    'var_d30_fsdp8': ('var_d30', {'data': 1, 'fsdp': 8, 'tensor': 1}),
    'elm_ar_2b_fsdp4_tensor2': ('elm_ar_2b', {'data': 1, 'fsdp': 4, 'tensor': 2}),
    'bigr_xxl_data2_fsdp4': ('bigr_xxl', {'data': 2, 'fsdp': 4, 'tensor': 1}),
    'bae_k16_data8': ('bae_k16', {'data': 8, 'fsdp': 1, 'tensor': 1}),
}


def _specs(tree):
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path)] = [list(a) if isinstance(a, tuple) else a for a in s.spec]
  return out


def layout(config_name: str, mesh_axes) -> dict:
  c = load_config(config_name)
  c.mesh.update(mesh_axes)
  task = tasks.build(c, shd.make_mesh(c.mesh.to_dict()), num_train_examples=1_281_167)
  return _specs(task.shardings)


@pytest.mark.parametrize('name', sorted(CASES))
def test_sharding_matches_golden(name):
  got = layout(*CASES[name])
  path = GOLDEN / f'{name}.json'
  if os.environ.get('VAR_JAX_UPDATE_GOLDENS'):
    GOLDEN.mkdir(exist_ok=True)
    path.write_text('{\n' + ',\n'.join(f'{json.dumps(k)}: {json.dumps(got[k])}' for k in sorted(got)) + '\n}\n')
  want = json.loads(path.read_text())
  assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:10]
  diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
  assert not diff, f'{len(diff)} leaves changed sharding (golden, now): {dict(list(diff.items())[:10])}'


def test_large_models_are_really_sharded():
  """The goldens are not vacuous: every >= 1M-element leaf of the 2B ELM is split over fsdp."""
  c = load_config('elm_ar_2b')
  c.mesh.update(data=1, fsdp=8, tensor=1)
  task = tasks.build(c, shd.make_mesh(c.mesh.to_dict()), num_train_examples=1_281_167)
  shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(task.abstract)[0]}
  for k, spec in _specs(task.shardings).items():
    n = 1
    for d in shapes[k]:
      n *= d
    if n >= 1 << 20:
      assert any(a == 'fsdp' or (isinstance(a, list) and 'fsdp' in a) for a in spec), (k, shapes[k], spec)
