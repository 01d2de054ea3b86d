"""Released weights by name (``var_jax.hub``): every name of the table resolves through ``hf_hub_download`` in a
local hub-layout cache (offline); one name per family loads through ``from_pretrained``, ``load_pipeline`` and the
sampling CLI's ``--pretrained``; bad names and missing files are one clear error."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from hub_cache import COMMIT, add_file, fixture_cache, offline_env
from var_jax import BiGRPipeline, ELMPipeline, VARPipeline, hub
from var_jax.pipelines import pretrained


@pytest.fixture
def offline(monkeypatch, tmp_path):
  cache = tmp_path / 'hub'
  cache.mkdir()
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return cache


def test_every_release_resolves(offline):
  for name, r in hub.RELEASES.items():
    add_file(offline, r.repo, r.file, f'{r.repo}/{r.file}'.encode())
  for name, r in hub.RELEASES.items():
    got = hub.resolve(name)
    assert got.kind == r.kind and got.model_args == r.model_args, name
    want_model = f'{r.repo}/{r.file}'
    if r.tokenizer is None:
      assert got.model is None and open(got.tokenizer, 'rb').read() == want_model.encode(), name
      continue
    t = hub.RELEASES[r.tokenizer]
    assert t.kind == {'var': 'vqvae', 'elm': 'bae', 'bigr': 'bae'}[r.kind], name
    assert open(got.model, 'rb').read() == want_model.encode(), name
    assert open(got.tokenizer, 'rb').read() == f'{t.repo}/{t.file}'.encode(), name
    assert f'models--{r.repo.replace("/", "--")}' in got.model and COMMIT in got.model
  # every generator family and every released tokenizer is in the table
  assert set(hub.names('var')) == {'var_d16', 'var_d20', 'var_d24', 'var_d30', 'var_d36'}
  assert len(hub.names('elm')) == 15 and len(hub.names('bigr')) == 5
  assert {r.tokenizer for r in hub.RELEASES.values() if r.tokenizer} <= set(hub.names('vqvae') + hub.names('bae'))


def test_revision_pinning(offline):
  r = hub.RELEASES['vae_ch160v4096z32']
  old = '1' * 40
  add_file(offline, r.repo, r.file, b'new')
  add_file(offline, r.repo, r.file, b'old', commit=old, ref='v1')
  assert open(hub.resolve('vae_ch160v4096z32').tokenizer, 'rb').read() == b'new'
  assert open(hub.resolve(f'vae_ch160v4096z32@{old}').tokenizer, 'rb').read() == b'old'
  assert open(hub.resolve('vae_ch160v4096z32', revision='v1').tokenizer, 'rb').read() == b'old'
  assert open(hub.local_path('vae_ch160v4096z32@v1'), 'rb').read() == b'old'


def test_errors(offline):
  with pytest.raises(ValueError, match=r"unknown released model 'var_d17'; known names: var: var_d16 .*elm: L-1-16"):
    hub.resolve('var_d17')
  with pytest.raises(FileNotFoundError, match=r'var_d16: FoundationVision/var/var_d16.pth is not in the hub cache '
                                               r'.*HF_HUB_OFFLINE is set'):
    hub.resolve('var_d16')
  with pytest.raises(ValueError, match=r"'L-2-10' is a released elm file, not a var model; VARPipeline loads: var_d16"):
    VARPipeline.from_pretrained('L-2-10')
  with pytest.raises(ValueError, match='is a released tokenizer'):
    pretrained.load_pipeline(pretrained='bae_20')
  with pytest.raises(ValueError, match='give either --pretrained or --vae_ckpt, not both'):
    pretrained.load_pipeline('vae.pth', pretrained='var_d16')
  with pytest.raises(ValueError, match='is a released var model, not --model=elm'):
    pretrained.load_pipeline(pretrained='var_d16', model='elm')
  with pytest.raises(ValueError, match='config.init_from=vae_ch160v4096z32 is a released vqvae file; expected one '
                                       'of kind var'):
    hub.local_path('vae_ch160v4096z32', 'config.init_from', kinds=('var',))
  assert hub.local_path('/some/local/file.pth') == '/some/local/file.pth'   # local paths pass through


def test_training_config_names(offline):
  from tests_helpers import load_config
  fixture_cache(offline)
  config = load_config('quickstart')
  config.init_from, config.vae_ckpt = 'var_d16', 'vae_ch160v4096z32'
  got = hub.resolve_config(config)
  assert got.init_from == hub.resolve('var_d16').model and got.vae_ckpt == hub.resolve('var_d16').tokenizer
  assert config.init_from == 'var_d16'                              # a copy
  config.vae_ckpt = '/local/vae.pth'
  assert hub.resolve_config(config).vae_ckpt == '/local/vae.pth'  # local paths stay
  config.init_from = 'L-2-10'
  with pytest.raises(ValueError, match='config.init_from=L-2-10 is a released elm file; expected one of kind var'):
    hub.resolve_config(config)
  plain = load_config('quickstart')
  assert hub.resolve_config(plain) is plain


def test_from_pretrained_each_family(offline):
  args = fixture_cache(offline)
  var = VARPipeline.from_pretrained('var_d16')
  assert var.var_config.depth > 0 and var.num_classes == 10
  elm = ELMPipeline.from_pretrained('L-2-10', **args['L-2-10'])
  assert elm.modeling == 'ar' and elm.token_each == 2
  mlm = pretrained.load_pipeline(pretrained='mlmL-1-16', model_args=args['mlmL-1-16'])
  assert isinstance(mlm, ELMPipeline) and mlm.modeling == 'mlm'
  bigr = BiGRPipeline.from_pretrained('bigr_L_d24', **args['bigr_L_d24'])
  assert bigr.bigr_config.p_flip and bigr.bigr_config.n_head == 4
  # the table's ModelArgs apply where the caller does not override them (n_head=16 divides the tiny dim 64)
  assert BiGRPipeline.from_pretrained('bigr_L_d24').bigr_config.n_head == 16
  # the same weights as the fixture files loaded by path
  from conftest import fixture_dir
  d = fixture_dir('tiny')
  ref = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  assert ref.var_config == var.var_config and ref.vae_config == var.vae_config
  for a, b in zip(jax.tree.leaves(var.var_variables), jax.tree.leaves(ref.var_variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow   # two CLI processes (JAX start, sampler compile)
def test_sample_cli_pretrained(tmp_path):
  cache = tmp_path / 'hub'
  fixture_cache(cache)
  env = offline_env(cache, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'var_jax.sample', '--pretrained=var_d16', '--classes=0,5', '--top_k=5',
         f'--out={tmp_path / "g.png"}']
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / 'g.png').is_file()
  bad = subprocess.run(cmd[:3] + ['--pretrained=var_d99', f'--out={tmp_path / "x.png"}'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "error: unknown released model 'var_d99'; known names:" in bad.stderr
  assert not (tmp_path / 'x.png').exists()
