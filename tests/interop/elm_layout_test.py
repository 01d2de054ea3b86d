"""ELM checkpoints: the fixture files round-trip exactly, the released layouts import (shapes only, nothing
allocated), and configs are inferred from the shapes (contradicting model_args are named)."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta

from conftest import SHARED
from var_jax.interop import elm as ie
from var_jax.interop.state_dict import CheckpointMismatchError, load_state_dict
from var_jax.models.elm import ELMConfig

FIX = SHARED / 'fixtures' / 'elm_bigr_reference'
LAYOUTS = FIX / 'official_layout'
FIXTURES = ('elm_ar_1x8', 'elm_ar_2x4', 'elm_mlm_1x8', 'elm_mlm_2x4')
PRESETS = {'L': (24, 1024, 16), 'XL': (36, 1280, 20), 'XXL': (48, 1536, 24), '2B': (48, 1792, 28)}


def _fixture(name):
  d = FIX / name
  return load_state_dict(d / 'model.pth'), json.loads((d / 'config.json').read_text())


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_round_trip(name, tmp_path):
  sd, meta_cfg = _fixture(name)
  cfg = ie.infer_elm_config(sd, **meta_cfg['model_args'])
  variables = ie.import_elm(sd, cfg, keep_unused=True)
  n_params = sum(int(np.prod(s)) for s in _shapes(variables['params']).values())
  n_unused = sum(int(np.prod(np.shape(a))) for a in variables.get(ie.UNUSED, {}).values())
  assert n_params + n_unused == meta_cfg['params']
  out = ie.export_elm(variables, cfg)
  assert list(out) == list(sd)                       # every key, in the reference's order
  for k in sd:
    assert out[k].dtype == np.float32 and out[k].shape == sd[k].shape
    np.testing.assert_array_equal(out[k], sd[k], err_msg=k)
  # through a file: torch.load of what we write gives the same tensors
  ie.save_elm(variables, cfg, tmp_path / 'm.pth')
  back = torch.load(tmp_path / 'm.pth', weights_only=True)
  assert list(back) == list(sd)
  assert all(torch.equal(back[k], torch.from_numpy(sd[k])) for k in sd)
  # the imported tree is exactly the tree our module creates
  model = ie.elm_model(cfg)
  x = jnp.zeros((1, cfg.seq_len, cfg.token_each), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
  assert _shapes(abstract['params']) == _shapes(variables['params'])


@pytest.mark.parametrize('name', ('elm_mlm_1x8', 'elm_mlm_2x4'))
def test_mlm_without_unused_heads(name):
  """Released MLM files lack the unused ``output`` head (maybe proj/pos_embed too): import tolerates it, export
  writes zeros for them by default (so strict loading works) or leaves them out."""
  sd, meta_cfg = _fixture(name)
  ma = dict(meta_cfg['model_args'])
  cfg = ie.infer_elm_config(sd, **ma)
  stripped = {k: v for k, v in sd.items() if not re.match(r'(output|proj|pos_embed)\b', k)}
  cfg2 = ie.infer_elm_config(stripped, **ma)
  assert cfg2 == cfg
  v = ie.import_elm(stripped, cfg2, keep_unused=True)
  assert ie.UNUSED not in v
  full = ie.export_elm(v, cfg2)
  assert list(full) == list(sd)
  for k in sd:
    if k in stripped:
      np.testing.assert_array_equal(full[k], sd[k])
    else:
      assert not full[k].any() and full[k].shape == sd[k].shape
  assert list(ie.export_elm(v, cfg2, include_unused=False)) == list(stripped)
  # without token_each, an MLM file that has neither proj nor output.i is taken as T = 1
  if cfg.token_each == 1:
    ma.pop('token_each')
    assert ie.infer_elm_config(stripped, **ma).token_each == 1


def _layout_files():
  return sorted(p.stem for p in LAYOUTS.glob('elm_*.json'))


def test_all_elm_layouts_listed():
  assert len(_layout_files()) == 15


@pytest.mark.parametrize('name', _layout_files())
def test_official_layout(name):
  lay = json.loads((LAYOUTS / f'{name}.json').read_text())
  summary = json.loads((LAYOUTS / 'params_summary.json').read_text())
  assert summary[f'{name}.json'] == lay['params']
  modeling, size, te, cd = re.match(r'elm_(ar|mlm)_(\w+?)_(\d+)-(\d+)$', name).groups()
  # read-only broadcast views: billions of zeros without allocating them
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in lay['tensors'].items()}
  if modeling == 'mlm':
    sd.pop('output.weight')            # as in the released files
  cfg = ie.infer_elm_config(sd)        # no model_args: preset heads, reference defaults
  n_layer, dim, n_head = PRESETS[size]
  assert (cfg.modeling, cfg.n_layer, cfg.dim, cfg.n_head) == (modeling, n_layer, dim, n_head)
  assert (cfg.token_each, cfg.code_dim, cfg.num_classes, cfg.multiple_of) == (int(te), int(cd), 1000, 256)
  assert cfg.block_size == 256 and cfg.n_kv_head is None and not cfg.use_adaLN
  variables = ie.import_elm(sd, cfg, keep_unused=True)
  model = ie.elm_model(cfg)
  x = jnp.zeros((1, cfg.seq_len, cfg.token_each), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
  ours = _shapes(abstract['params'])
  assert ours == _shapes(variables['params'])
  n = sum(int(np.prod(s)) for s in ours.values())
  unused = {k: tuple(s) for k, s in lay['tensors'].items() if modeling == 'mlm' and
            re.match(r'(output|proj|pos_embed)\b', k)}
  assert n + sum(int(np.prod(s)) for s in unused.values()) == lay['params']
  out = ie.export_elm(variables, cfg)
  assert list(out) == list(lay['tensors'])
  assert {k: list(v.shape) for k, v in out.items()} == lay['tensors']


def test_contradicting_model_args_are_named():
  sd, meta_cfg = _fixture('elm_ar_2x4')
  ma = dict(meta_cfg['model_args'])
  for field, wrong in (('dim', 128), ('n_layer', 3), ('token_each', 1), ('code_dim', 8), ('num_classes', 1000),
                       ('multiple_of', 256), ('use_adaLN', True), ('n_kv_head', 2)):
    with pytest.raises(CheckpointMismatchError, match=rf'\b{field}\b'):
      ie.infer_elm_config(sd, **{**ma, field: wrong})
  with pytest.raises(CheckpointMismatchError, match='modeling'):
    ie.infer_elm_config(sd, modeling='mlm')
  with pytest.raises(TypeError, match='mask_ratio_min'):     # an MLM-only ModelArgs field for an AR file
    ie.infer_elm_config(sd, mask_ratio_min=0.5)
  sd_m, meta_m = _fixture('elm_mlm_2x4')
  with pytest.raises(CheckpointMismatchError, match='block_size'):
    ie.infer_elm_config(sd_m, **{**meta_m['model_args'], 'block_size': 64})
  # a config that does not fit the file is reported key by key
  cfg = ie.infer_elm_config(sd, **ma)
  other = ELMConfig.from_model_args('ar', **{**ma, 'n_layer': 3})
  with pytest.raises(CheckpointMismatchError, match=r"missing key 'layers\.2\.attention\.wqkv\.weight'"):
    ie.import_elm(sd, other)
  with pytest.raises(CheckpointMismatchError, match="unexpected key 'extra'"):
    ie.import_elm({**sd, 'extra': np.zeros(3, np.float32)}, cfg)


def test_shape_determined_fields_without_model_args():
  """Only the fields the shapes cannot give need model_args (n_head, block_size for AR, ...)."""
  sd, meta_cfg = _fixture('elm_ar_2x4')
  cfg = ie.infer_elm_config(sd, n_head=4, block_size=16)
  ma = meta_cfg['model_args']
  for f in ('dim', 'n_layer', 'token_each', 'code_dim', 'num_classes', 'multiple_of', 'use_adaLN'):
    assert getattr(cfg, f) == ma[f], f
  assert cfg.token_dropout_p == ELMConfig.token_dropout_p    # reference defaults otherwise
