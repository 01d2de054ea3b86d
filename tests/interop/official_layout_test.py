"""The released checkpoints' layouts (key -> shape) import into our params and export back, for every model."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from conftest import VAR_FIXTURES
from var_jax import VAR, VQVAE, PATCH_NUMS_256, PATCH_NUMS_512
from var_jax.interop import var as ref
from var_jax.models.var import block_causal_mask, level_ids

LAYOUTS = VAR_FIXTURES / 'official_layout'


def _layout(name):
  return json.loads((LAYOUTS / f'{name}.json').read_text())


def _zero_state_dict(tensors, patch_nums=None):
  # read-only broadcast views: billions of zeros without allocating them
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in tensors.items()}
  if patch_nums is not None:   # the derived buffers must describe the model's patch_nums
    sd['lvl_1L'] = level_ids(patch_nums)[None]
    sd['attn_bias_for_masking'] = np.where(block_causal_mask(patch_nums), 0., -np.inf).astype(np.float32)[None, None]
  return sd


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


@pytest.mark.parametrize('depth', [16, 20, 24, 30, 36])
def test_var_layout(depth):
  lay = _layout(f'var_d{depth}')
  pn = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
  sd = _zero_state_dict(lay['tensors'], pn)
  cfg = ref.var_config_from_state_dict(sd)
  assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (depth, 64 * depth, depth)
  assert cfg.patch_nums == pn and cfg.shared_aln == (depth == 36) and cfg.attn_l2_norm
  assert (cfg.vocab_size, cfg.z_channels, cfg.num_classes) == (4096, 32, 1000)
  variables = ref.import_var(sd, cfg)
  # the imported tree is exactly the tree our module creates
  abstract = jax.eval_shape(VAR(cfg).init, jax.random.key(0), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, cfg.seq_len - cfg.first_l, cfg.z_channels)))
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert sum(int(np.prod(s)) for s in _shapes(variables['params']).values()) == lay['params']
  # ... and exports back to every key and shape of the release
  out = ref.export_var(variables, cfg)
  assert {k: list(v.shape) for k, v in out.items()} == lay['tensors']
  assert list(out) == list(lay['tensors'])   # the reference's state_dict order
  # without lvl_1L the standard list is recognised from the sequence length
  del sd['lvl_1L']
  assert ref.var_config_from_state_dict(sd).patch_nums == pn


def test_vae_layout():
  lay = _layout('vae_ch160v4096z32')   # a flat key -> shape table
  sd = _zero_state_dict(lay)
  cfg = ref.vae_config_from_state_dict(sd)
  assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.ch_mult) == (4096, 32, 160, (1, 1, 2, 2, 4))
  assert (cfg.share_quant_resi, cfg.num_res_blocks, cfg.using_sa, cfg.using_mid_sa) == (4, 2, True, True)
  variables = ref.import_vae(sd, cfg)
  abstract = jax.eval_shape(lambda k, x: VQVAE(cfg).init(k, x, method=VQVAE.init_all), jax.random.key(0),
                            jnp.zeros((1, 256, 256, 3)))
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert _shapes(variables['vq_stats']) == _shapes(abstract['vq_stats'])
  out = ref.export_vae(variables, cfg)
  assert {k: list(v.shape) for k, v in out.items()} == lay
  assert list(out) == list(lay)   # the reference's state_dict order
