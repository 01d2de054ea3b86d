"""BiGR checkpoint interop: the fixture's bigr.pt round-trips identically; the released layouts import and export."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta

from conftest import SHARED
from var_jax.interop import bigr as ib
from var_jax.interop.state_dict import CheckpointMismatchError
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.bigr import BiGR

REF = SHARED / 'fixtures' / 'elm_bigr_reference'
FIX = REF / 'bigr_k8'
LAYOUTS = REF / 'official_layout'


def _model_args():
  return json.loads((FIX / 'config.json').read_text())['model_args']


def _torch_sd(path):
  return torch.load(path, map_location='cpu', weights_only=True)['ema']


def test_roundtrip_identical(tmp_path):
  cfg, variables = ib.load_bigr(FIX / 'bigr.pt', **_model_args())
  assert cfg.model_args() == _model_args()
  ib.save_bigr(tmp_path / 'bigr.pt', variables, cfg)
  a, b = _torch_sd(FIX / 'bigr.pt'), _torch_sd(tmp_path / 'bigr.pt')
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k
  # the aliased transcoder keys share one storage, as in the reference's file
  for k in a:
    if k.startswith(ib.ALIAS_PREFIX):
      p = ib.alias_primary(k)
      assert a[k].data_ptr() == a[p].data_ptr()
      assert b[k].data_ptr() == b[p].data_ptr(), k
  # a plain state_dict (no {'ema': ...} wrapper) and safetensors load too
  ib.save_bigr(tmp_path / 'plain.pth', variables, cfg, wrap_ema=False)
  ib.save_bigr(tmp_path / 'bigr.safetensors', variables, cfg)
  for name in ('plain.pth', 'bigr.safetensors'):
    cfg2, v2 = ib.load_bigr(tmp_path / name, n_head=4, cls_token_num=1, p_flip=True, infer_steps=10)
    assert (cfg2.dim, cfg2.n_layer, cfg2.multiple_of, cfg2.block_size, cfg2.use_adaLN) == (64, 3, 64, 16, True)
    jax.tree.map(np.testing.assert_array_equal, v2, variables)


def test_config_inference_and_errors():
  sd = ib.load_bigr_state_dict(FIX / 'bigr.pt')
  cfg = ib.bigr_config_from_state_dict(sd, n_head=4)
  want = _model_args()
  for f in ('dim', 'n_layer', 'binary_size', 'num_classes', 'seq_len', 'block_size', 'use_adaLN',
            'denoise_hidden_dim', 'num_block_mlp', 'n_sample_steps', 'multiple_of', 'n_kv_head'):
    assert getattr(cfg, f) == want[f], f
  with pytest.raises(CheckpointMismatchError, match='n_layer'):
    ib.bigr_config_from_state_dict(sd, n_head=4, n_layer=4)
  with pytest.raises(CheckpointMismatchError, match='n_sample_steps'):
    ib.bigr_config_from_state_dict(sd, n_head=4, n_sample_steps=100)
  with pytest.raises(CheckpointMismatchError, match='multiple_of'):
    ib.bigr_config_from_state_dict(sd, n_head=4, multiple_of=256)
  with pytest.raises(ValueError, match='not_a_field'):
    ib.bigr_config_from_state_dict(sd, not_a_field=1)
  # aliased keys must hold the same values as denoise_mlp.*
  bad = dict(sd)
  key = ib.ALIAS_PREFIX + 'x_embedder.bias'
  bad[key] = sd[key] + 1
  with pytest.raises(CheckpointMismatchError, match='x_embedder.bias'):
    ib.import_bigr(bad, cfg)
  # scheduler buffers must be our schedule
  bad = dict(sd)
  bad[ib.SCHED_PREFIX + 'b_final'] = sd[ib.SCHED_PREFIX + 'b_final'] * 0.9
  with pytest.raises(CheckpointMismatchError, match='scheduler.b_final'):
    ib.import_bigr(bad, cfg)
  bad = dict(sd)
  del bad['norm.weight']
  with pytest.raises(CheckpointMismatchError, match="missing key 'norm.weight'"):
    ib.import_bigr(bad, cfg)


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


@pytest.mark.parametrize('name,size', [('bigr_L_d24', (24, 1024, 16, 3, 24, 256)),
                                       ('bigr_XL_d24', (36, 1280, 20, 6, 24, 256)),
                                       ('bigr_XXL_d24', (48, 1536, 24, 8, 24, 256)),
                                       ('bigr_XXL_d32', (48, 1536, 24, 8, 32, 256)),
                                       ('bigr_L-512_d32', (24, 1024, 16, 6, 32, 1024))])
def test_official_layout(name, size):
  lay = json.loads((LAYOUTS / f'{name}.json').read_text())
  tensors = lay['tensors']
  # read-only broadcast views: no memory for the zeros; the scheduler buffers must be the real schedule
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in tensors.items()}
  T = tensors[ib.SCHED_PREFIX + 'beta'][0] - 1
  for n, v in bd.make_schedule(T).items():
    sd[ib.SCHED_PREFIX + n] = v
  cfg = ib.bigr_config_from_state_dict(sd, p_flip=True)
  n_layer, dim, n_head, n_mlp, k, seq = size
  assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.num_block_mlp, cfg.binary_size, cfg.seq_len) == size
  assert cfg.use_adaLN and cfg.num_classes == 1000 and cfg.multiple_of == 256 and cfg.n_sample_steps == 256
  variables = ib.import_bigr(sd, cfg)
  abstract = jax.eval_shape(BiGR(cfg).init, jax.random.key(0), jnp.zeros((1, seq, k)), jnp.zeros((1,), jnp.int32))
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert sum(int(np.prod(s)) for s in _shapes(abstract['params']).values()) == lay['params']
  out = ib.export_bigr(variables, cfg)
  assert list(out) == list(tensors)   # the reference's state_dict order, aliases and buffers included
  assert {k: list(v.shape) for k, v in out.items()} == tensors
  assert len(out) == lay['state_dict_entries']
