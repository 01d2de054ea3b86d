"""BAE checkpoint interop: exact round trip of the fixture file, the released layouts, config inference, errors."""
import collections
import dataclasses
import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import meta

from conftest import SHARED
from var_jax.interop import bae as ibae
from var_jax.interop.state_dict import CheckpointMismatchError
from var_jax.models.bae import UNUSED, BAEConfig, BinaryAutoEncoder

ROOT = SHARED / 'fixtures' / 'elm_bigr_reference'
CKPT = ROOT / 'bae_k8' / 'binaryae.th'
LAYOUTS = ROOT / 'official_layout'
SUMMARY = json.loads((LAYOUTS / 'params_summary.json').read_text())


def _zero_sd(shapes):
  # read-only broadcast views: a 65M-parameter layout without allocating it
  return collections.OrderedDict((k, np.broadcast_to(np.float32(0), tuple(s))) for k, s in shapes.items())


def _abstract(cfg):
  """Our module's variables as shapes (no allocation), boxed with their logical axis names."""
  x = jax.ShapeDtypeStruct((1, 2 ** (cfg.num_levels - 1), 2 ** (cfg.num_levels - 1), cfg.in_channels), jnp.float32)
  return jax.eval_shape(lambda k, x: BinaryAutoEncoder(cfg).init(k, x, train=False), jax.random.key(0), x)


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


def _n(tree):
  return sum(int(np.prod(s)) for s in _shapes(tree).values())


def test_fixture_round_trip_identical(tmp_path):
  ref = torch.load(CKPT, map_location='cpu', weights_only=True)
  cfg, variables, extras = ibae.load_bae(CKPT, resolution=64)
  assert extras == {} and set(variables) == {'params', UNUSED}
  out = ibae.export_bae(variables, cfg, prefix='ae.')
  assert list(out) == list(ref)                                    # same keys, same order
  for k, v in ref.items():
    assert out[k].dtype == np.float32 and v.dtype == torch.float32, k
    np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
  # written and read back by torch, and through the reference's own loader rule (keys starting with 'ae')
  ibae.save_bae(variables, cfg, tmp_path / 'bae.th')
  back = torch.load(tmp_path / 'bae.th', map_location='cpu', weights_only=True)
  assert list(back) == list(ref)
  for k, v in ref.items():
    assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
  stripped = {k.split('.', 1)[-1]: v for k, v in back.items() if k.startswith('ae')}
  assert list(stripped) == list(ibae.export_bae(variables, cfg))
  # the imported tree is exactly the tree our module creates
  abstract = _abstract(cfg)
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert _shapes(variables[UNUSED]) == _shapes(abstract[UNUSED])


def test_init_has_logical_axes_and_exports():
  cfg = BAEConfig(nf=32, ch_mult=(1, 2), res_blocks=1, attn_resolutions=(8,), resolution=16, codebook_size=4,
                  emb_dim=32)
  abstract = _abstract(cfg)
  for path, leaf in traverse_util.flatten_dict({**abstract['params'], **abstract[UNUSED]}).items():
    assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == len(leaf.value.shape), path
  # values for that tree (a real init compiles for ~40 s on a loaded CPU; the shapes are what matters here)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), meta.unbox(abstract))
  sd = ibae.export_bae(variables, cfg)
  assert ibae.bae_config_from_state_dict(sd, resolution=16) == cfg
  # params alone (e.g. after training): the never-read tensors are written as zeros
  sd2 = ibae.export_bae({'params': variables['params']}, cfg)
  assert list(sd2) == list(sd)
  assert np.all(sd2['generator.logsigma.0.weight'] == 0) and np.all(sd2['encoder.blocks.1.conv_out.weight'] == 0)
  np.testing.assert_array_equal(sd2['encoder.blocks.3.conv_out.weight'], sd['encoder.blocks.3.conv_out.weight'])


@pytest.mark.parametrize('name', sorted(n[:-5] for n in SUMMARY if n.startswith('bae_')))
def test_official_layout(name):
  lay = json.loads((LAYOUTS / f'{name}.json').read_text())
  px = 512 if name.endswith('512px') else 256
  sd = _zero_sd({'ae.' + k: s for k, s in lay['tensors'].items()})     # as released: 'ae.'-prefixed
  cfg = ibae.bae_config_from_state_dict(sd, resolution=px)
  k = int(name.split('_')[1][1:])
  assert cfg == BAEConfig(nf=128, ch_mult=(1, 1, 2, 2, 4), res_blocks=2,
                          attn_resolutions=() if px == 512 else (16,), resolution=px, codebook_size=k, emb_dim=256,
                          norm_first=True, gen_mul=1.0)
  table = ibae.bae_table(cfg)
  assert [e.key for e in table] == list(lay['tensors'])             # every key, in the reference's order
  assert {e.key: list(e.shape) for e in table} == lay['tensors']
  assert ibae.bae_param_count(cfg) == SUMMARY[f'{name}.json'] == lay['params']
  abstract = _abstract(cfg)
  assert _n(abstract['params']) + _n(abstract[UNUSED]) == SUMMARY[f'{name}.json']
  variables = ibae.import_bae(sd, cfg)
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert _shapes(variables[UNUSED]) == _shapes(abstract[UNUSED])
  out = ibae.export_bae(variables, cfg)
  assert {k: list(v.shape) for k, v in out.items()} == lay['tensors'] and list(out) == list(lay['tensors'])
  if px == 512:   # the 512px release read with the 256px default: still no per-level attention
    assert ibae.bae_config_from_state_dict(sd).attn_resolutions == ()


@pytest.mark.parametrize('cfg', [
    BAEConfig(nf=32, ch_mult=(1, 2, 2), res_blocks=2, attn_resolutions=(32, 8), resolution=32, codebook_size=5,
              emb_dim=64, norm_first=False, gen_mul=1.5),
    BAEConfig(nf=64, ch_mult=(1,), res_blocks=1, attn_resolutions=(16,), resolution=16, codebook_size=3,
              emb_dim=40, norm_first=False, gen_mul=3.0, in_channels=1),
    BAEConfig(nf=32, ch_mult=(2, 1, 4, 1), res_blocks=3, attn_resolutions=(), resolution=64, codebook_size=12,
              emb_dim=32, norm_first=True, gen_mul=1 / 3),
], ids=['gen_mul1.5_two_attn', 'one_level', 'gen_mul_third'])
def test_config_inference_general(cfg):
  sd = _zero_sd({e.key: e.shape for e in ibae.bae_table(cfg)})
  # gen_mul comes back as (decoder blocks / res_blocks): the same network
  assert ibae.bae_config_from_state_dict(sd, resolution=cfg.resolution) == dataclasses.replace(
      cfg, gen_mul=cfg.decoder_res_blocks / cfg.res_blocks)
  abstract = _abstract(cfg)
  variables = ibae.import_bae(sd, cfg)
  assert _shapes(variables['params']) == _shapes(abstract['params'])
  assert _shapes(variables.get(UNUSED, {})) == _shapes(abstract.get(UNUSED, {}))
  assert _n(abstract['params']) + _n(abstract.get(UNUSED, {})) == ibae.bae_param_count(cfg)


def test_prefixes_extras_and_errors(caplog):
  ref = torch.load(CKPT, map_location='cpu', weights_only=True)
  sd = {k: v.numpy() for k, v in ref.items()}
  cfg = ibae.bae_config_from_state_dict(sd, resolution=64)
  plain = {k[3:]: v for k, v in sd.items()}
  a, b = ibae.import_bae(sd, cfg), ibae.import_bae(plain, cfg)
  for (pa, va), (pb, vb) in zip(traverse_util.flatten_dict(a).items(), traverse_util.flatten_dict(b).items()):
    assert pa == pb and np.array_equal(va, vb)
  # the released EMA files also hold the discriminator and LPIPS: set aside, reported, not an error
  extra = {'disc.main.0.weight': np.zeros((64, 3, 4, 4), np.float32),
           'perceptual.lin0.model.1.weight': np.zeros((1, 64, 1, 1), np.float32)}
  with caplog.at_level(logging.INFO):
    own, got = ibae.split_bae_state_dict({**sd, **extra})
  assert set(got) == set(extra) and list(own) == list(plain)
  assert 'disc' in caplog.text and 'perceptual' in caplog.text
  # unknown keys and wrong shapes name the key
  with pytest.raises(CheckpointMismatchError, match='optimizer.state'):
    ibae.split_bae_state_dict({**sd, 'optimizer.state': np.zeros(3)})
  with pytest.raises(CheckpointMismatchError, match='generator.extra.weight'):
    ibae.import_bae({**plain, 'generator.extra.weight': np.zeros(3)}, cfg)
  bad = dict(plain)
  bad['encoder.blocks.7.conv2.weight'] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"encoder\.blocks\.7\.conv2\.weight.*\(32, 32, 3, 3\)"):
    ibae.import_bae(bad, cfg)
  missing = dict(plain)
  del missing['generator.logsigma.2.bias']
  with pytest.raises(CheckpointMismatchError, match='generator.logsigma.2.bias'):
    ibae.import_bae(missing, cfg)
  # a config that does not fit (another K) names the mismatching keys
  with pytest.raises(CheckpointMismatchError, match='quantize.embed.weight'):
    ibae.import_bae(plain, dataclasses.replace(cfg, codebook_size=16))
