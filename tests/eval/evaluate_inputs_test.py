"""``evaluate`` checks every input and output path before it samples anything: a missing or unreadable Inception
file, a malformed reference batch or one with NaN statistics fail first (no PNG written), with the file named."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, fixture_dir
from var_jax.eval import evaluator, inputs


class _NoSampling:
  """A pipeline stub: any use means sampling started."""
  family = 'var'

  @property
  def num_classes(self):
    raise AssertionError('sampling started before the inputs were checked')


def _inception_stub(path):
  """A file with a valid .safetensors header (contents are not read by the checks)."""
  from safetensors.numpy import save_file
  save_file({'conv/kernel': np.zeros((1,), np.float32)}, str(path))
  return str(path)


def _evaluate(tmp_path, **kw):
  return evaluator.evaluate(_NoSampling(), out_dir=str(tmp_path / 'ev'), classes=['1'], num_per_class=1, **kw)


def test_bad_inception_fails_before_sampling(tmp_path):
  with pytest.raises(ValueError, match='--inception is required'):
    _evaluate(tmp_path)
  with pytest.raises(FileNotFoundError, match='FID Inception weights not found: .*missing.pth'):
    _evaluate(tmp_path, inception=str(tmp_path / 'missing.pth'))
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='junk.pth: neither a torch checkpoint'):
    _evaluate(tmp_path, inception=str(tmp_path / 'junk.pth'))
  (tmp_path / 'junk.safetensors').write_bytes(b'\xff' * 16)
  with pytest.raises(ValueError, match='junk.safetensors: not a readable .safetensors'):
    _evaluate(tmp_path, inception=str(tmp_path / 'junk.safetensors'))
  assert not os.path.exists(tmp_path / 'ev' / 'samples')


def test_bad_reference_fails_before_sampling(tmp_path):
  inc = _inception_stub(tmp_path / 'inc.safetensors')
  np.savez(tmp_path / 'wrong_keys.npz', foo=np.zeros(3))
  with pytest.raises(KeyError, match="wrong_keys.npz: expected 'arr_0' images"):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'wrong_keys.npz'))
  np.savez(tmp_path / 'nan_stats.npz', mu=np.full(4, np.nan), sigma=np.eye(4))
  with pytest.raises(ValueError, match='nan_stats.npz: the statistics mu/sigma hold NaN'):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'nan_stats.npz'))
  np.savez(tmp_path / 'bad_images.npz', arr_0=np.zeros((2, 8, 8), np.float32))
  with pytest.raises(ValueError, match=r'bad_images.npz: arr_0 must be uint8 images \(N, H, W, 3\)'):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'bad_images.npz'))
  (tmp_path / 'not_npz.npz').write_bytes(b'junk')
  with pytest.raises(ValueError, match='not_npz.npz: not an .npz archive'):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'not_npz.npz'))
  with pytest.raises(FileNotFoundError, match='no_ref: no such file'):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'no_ref'))
  np.savez(tmp_path / 'cache.npz', mu=np.zeros(4), sigma=np.full((4, 4), np.inf))
  np.savez(tmp_path / 'ok_stats.npz', mu=np.zeros(4), sigma=np.eye(4))
  with pytest.raises(ValueError, match='reference cache .*cache.npz: the statistics'):
    _evaluate(tmp_path, inception=inc, ref=str(tmp_path / 'ok_stats.npz'), ref_cache=str(tmp_path / 'cache.npz'))
  with pytest.raises(KeyError, match="samples .*ok_stats.npz has no 'arr_0'"):
    _evaluate(tmp_path, inception=inc, samples=str(tmp_path / 'ok_stats.npz'))
  assert not os.path.exists(tmp_path / 'ev' / 'samples')


def test_npz_header_does_not_load_the_array(tmp_path):
  np.savez(tmp_path / 'a.npz', arr_0=np.zeros((3, 4, 5, 3), np.uint8))
  assert inputs.npz_header(str(tmp_path / 'a.npz'), 'arr_0') == ((3, 4, 5, 3), np.dtype(np.uint8))


def test_nan_reference_statistics_are_an_error():
  ref = evaluator.Reference(np.full(3, np.nan), np.eye(3), None, 'ref_stats.npz')
  fake = {'pool3': np.random.default_rng(0).normal(size=(8, 3)), 'logits': np.zeros((8, 5))}
  with pytest.raises(ValueError, match='ref_stats.npz: mu/sigma hold NaN'):
    evaluator.sample_metrics(fake, ref)


def _run(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'var_jax.evaluate', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow   # ~40-75 s: two CLI runs that load the fixture model
def test_cli_fails_before_sampling(tmp_path):
  d = fixture_dir('tiny')
  model = [f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--classes=2', '--num_per_class=1']
  out = tmp_path / 'ev'
  r = _run(*model, f'--out_dir={out}', f'--inception={tmp_path / "missing.pth"}')
  assert r.returncode == 1 and 'error: FID Inception weights not found' in r.stderr, r.stderr[-2000:]
  np.savez(tmp_path / 'bad_ref.npz', foo=np.zeros(3))
  r = _run(*model, f'--out_dir={out}', f'--inception={_inception_stub(tmp_path / "inc.safetensors")}',
           f'--ref={tmp_path / "bad_ref.npz"}')
  assert r.returncode == 1 and 'bad_ref.npz: expected' in r.stderr, r.stderr[-2000:]
  assert not any(f.endswith('.png') for _, _, fs in os.walk(out) for f in fs)
