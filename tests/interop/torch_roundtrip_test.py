"""Import a reference checkpoint, export it again: every key, order, dtype, shape and value identical."""

import numpy as np
import pytest
import torch

from conftest import FIXTURE_MODELS, fixture_dir
from var_jax import VARPipeline
from var_jax.interop import state_dict as sd_io
from var_jax.interop import var as ref


def _load(path):
  return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_state_dict(a, b):
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('name', FIXTURE_MODELS)
@pytest.mark.parametrize('ext', ['.pth', '.safetensors'])
def test_roundtrip_identical(tmp_path, name, ext):
  d = fixture_dir(name)
  pipe = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  pipe.save_torch(tmp_path / f'vae{ext}', tmp_path / f'var{ext}')
  if ext == '.pth':
    _assert_same_state_dict(_load(d / 'vae.pth'), _load(tmp_path / 'vae.pth'))
    _assert_same_state_dict(_load(d / 'var.pth'), _load(tmp_path / 'var.pth'))
  else:
    for kind in ('vae', 'var'):
      orig = sd_io.load_state_dict(d / f'{kind}.pth')
      back = sd_io.load_state_dict(tmp_path / f'{kind}.safetensors')
      assert sorted(orig) == sorted(back)
      for k in orig:
        np.testing.assert_array_equal(orig[k], back[k], err_msg=k)
        assert orig[k].dtype == back[k].dtype, k
    # and the safetensors files load back into an identical pipeline
    pipe2 = VARPipeline.from_torch(tmp_path / 'vae.safetensors', tmp_path / 'var.safetensors')
    assert pipe2.var_config == pipe.var_config and pipe2.vae_config == pipe.vae_config


def test_fixture_config_inferred():
  import json
  for name in FIXTURE_MODELS:
    d = fixture_dir(name)
    cfg = json.loads((d / 'config.json').read_text())
    pipe = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
    v, t = pipe.vae_config, pipe.var_config
    assert (v.vocab_size, v.z_channels, v.ch, v.share_quant_resi) == (cfg['V'], cfg['Cvae'], cfg['ch'],
                                                                       cfg['share_quant_resi'])
    assert (t.depth, t.embed_dim, t.num_heads, t.num_classes) == (cfg['depth'], cfg['embed_dim'], cfg['num_heads'],
                                                                  cfg['num_classes'])
    assert (t.shared_aln, t.attn_l2_norm) == (cfg['shared_aln'], cfg['attn_l2_norm'])
    assert t.patch_nums == tuple(cfg['patch_nums']) == v.patch_nums
    assert v.image_size == cfg['image_size']


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def tiny_sds():
  d = fixture_dir('tiny')
  return sd_io.load_state_dict(d / 'vae.pth'), sd_io.load_state_dict(d / 'var.pth')


def _cfgs(tiny_sds):
  vae_sd, var_sd = tiny_sds
  var_cfg = ref.var_config_from_state_dict(var_sd)
  return ref.vae_config_from_state_dict(vae_sd, patch_nums=var_cfg.patch_nums), var_cfg


def test_missing_key_is_named(tiny_sds):
  vae_cfg, var_cfg = _cfgs(tiny_sds)
  sd = dict(tiny_sds[1])
  del sd['blocks.1.ffn.fc2.bias']
  with pytest.raises(sd_io.CheckpointMismatchError, match=r"missing key 'blocks.1.ffn.fc2.bias' \(expected shape \(128,\)\)"):
    ref.import_var(sd, var_cfg)


def test_unexpected_key_is_named(tiny_sds):
  vae_cfg, _ = _cfgs(tiny_sds)
  sd = dict(tiny_sds[0])
  sd['decoder.extra.weight'] = np.zeros((3, 3), np.float32)
  with pytest.raises(sd_io.CheckpointMismatchError, match=r"unexpected key 'decoder.extra.weight' \(found shape \(3, 3\)\)"):
    ref.import_vae(sd, vae_cfg)


def test_wrong_shape_names_expected_and_found(tiny_sds):
  _, var_cfg = _cfgs(tiny_sds)
  sd = dict(tiny_sds[1])
  sd['head.weight'] = np.zeros((64, 64), np.float32)
  with pytest.raises(sd_io.CheckpointMismatchError, match=r"key 'head.weight': expected shape \(64, 128\), found \(64, 64\)"):
    ref.import_var(sd, var_cfg)


def test_pipeline_error_names_the_file(tmp_path, tiny_sds):
  sd = {k: torch.from_numpy(v) for k, v in tiny_sds[1].items()}
  sd['blocks.0.attn.proj.weight'] = torch.zeros(128, 7)
  torch.save(sd, tmp_path / 'bad_var.pth')
  d = fixture_dir('tiny')
  with pytest.raises(sd_io.CheckpointMismatchError, match=r'(?s)bad_var\.pth.*blocks\.0\.attn\.proj\.weight'):
    VARPipeline.from_torch(d / 'vae.pth', tmp_path / 'bad_var.pth')


def test_missing_file(tmp_path):
  d = fixture_dir('tiny')
  with pytest.raises(FileNotFoundError, match=r'checkpoint file not found: .*nope\.pth'):
    VARPipeline.from_torch(tmp_path / 'nope.pth', d / 'var.pth')
  with pytest.raises(FileNotFoundError, match=r'checkpoint file not found: .*nope_var\.pth'):
    VARPipeline.from_torch(d / 'vae.pth', tmp_path / 'nope_var.pth')


def test_pickled_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ('pwned',))
  torch.save({'x': Evil()}, tmp_path / 'evil.pth')
  with pytest.raises(ValueError, match='evil.pth: not a loadable weights-only'):
    sd_io.load_state_dict(tmp_path / 'evil.pth')


def test_trainer_checkpoint_is_explained(tmp_path):
  torch.save({'trainer': {'var_wo_ddp': {'a': torch.zeros(1)}}, 'epoch': 3}, tmp_path / 'ar-ckpt.pth')
  with pytest.raises(ValueError, match=r"expected a flat state_dict.*'epoch', 'trainer'"):
    sd_io.load_state_dict(tmp_path / 'ar-ckpt.pth')


def test_patch_nums_mismatch_is_refused(tiny_sds):
  with pytest.raises(sd_io.CheckpointMismatchError, match='patch_nums'):
    ref.var_config_from_state_dict(tiny_sds[1], patch_nums=(1, 2, 3, 5))


def test_export_does_not_overwrite_on_failure(tmp_path):
  """A failed export leaves an existing file untouched (written to a temp file, then renamed)."""
  d = fixture_dir('tiny')
  pipe = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  target = tmp_path / 'var.pth'
  target.write_bytes(b'precious')
  broken = dict(pipe.var_variables)
  broken['params'] = {k: v for k, v in pipe.var_variables['params'].items() if k != 'head'}
  with pytest.raises(sd_io.CheckpointMismatchError, match="head"):
    sd_io.save_state_dict(ref.export_var(broken, pipe.var_config), target)
  assert target.read_bytes() == b'precious'
