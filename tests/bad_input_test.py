"""Bad inputs fail early with one message naming the culprit: edit's mask/range, the probe CLI, a bad BAE file,
and a single wrong-shape tensor among a VAR checkpoint's."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, fixture_dir
from var_jax.interop import var as ivar
from var_jax.interop.state_dict import CheckpointMismatchError, load_state_dict

ELM_DIR = SHARED / 'fixtures' / 'elm_bigr_reference'


@pytest.fixture(scope='module')
def tiny_var():
  from var_jax import VARPipeline
  d = fixture_dir('tiny')
  return VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')


def test_edit_rejects_mask_of_another_shape(tiny_var):
  s = tiny_var.vae_config.image_size
  img = np.zeros((1, s, s, 3), np.float32)
  with pytest.raises(ValueError, match=rf'keep_mask spatial shape \({s + 1}, {s}\).*\({s}, {s}\)'):
    tiny_var.edit(img, np.ones((s + 1, s), np.float32), labels=0, rng=0)


def test_edit_rejects_images_outside_range(tiny_var):
  s = tiny_var.vae_config.image_size
  img = np.full((1, s, s, 3), 255.0, np.float32)
  with pytest.raises(ValueError, match=r'\[-1, 1\].*min 255 max 255'):
    tiny_var.edit(img, np.ones((s, s), np.float32), labels=0, rng=0)


def test_probe_cli_input_error_is_one_line():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'var_jax.probe', '--bae_ckpt=/nonexistent.th',
                      '--bigr_ckpt=/nonexistent.pt'], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 1, r.stderr
  err = r.stderr.strip().splitlines()
  assert len(err) <= 3 and 'error:' in r.stderr and '/nonexistent.th' in r.stderr, r.stderr
  assert 'helpfull' not in r.stderr + r.stdout


def test_bad_bae_file_is_named_before_the_model(tmp_path):
  from var_jax.pipelines.pretrained import load_pipeline
  bae = tmp_path / 'binaryae.th'
  bae.write_bytes(np.random.default_rng(0).bytes(4096))
  for model in (ELM_DIR / 'elm_ar_1x8' / 'model.pth', bae):   # a valid and an invalid generator file
    with pytest.raises(ValueError, match='BAE checkpoint') as e:
      load_pipeline(bae_ckpt=str(bae), model_ckpt=str(model))
    assert str(bae) in str(e.value) and len(str(e.value).splitlines()) == 1
  with pytest.raises(FileNotFoundError, match='BAE checkpoint.*/nonexistent.th'):
    load_pipeline(bae_ckpt='/nonexistent.th', model_ckpt=str(ELM_DIR / 'elm_ar_1x8' / 'model.pth'))


def test_single_wrong_shape_var_tensor_is_named():
  sd = load_state_dict(fixture_dir('tiny') / 'var.pth')
  w = sd['blocks.0.ffn.fc1.weight']
  sd['blocks.0.ffn.fc1.weight'] = np.zeros((2 * w.shape[0], w.shape[1]), w.dtype)
  with pytest.raises(CheckpointMismatchError) as e:
    ivar.import_var(sd, ivar.var_config_from_state_dict(sd))
  msg = str(e.value)
  assert "'blocks.0.ffn.fc1.weight'" in msg and str(tuple(w.shape)) in msg and str((2 * w.shape[0], w.shape[1])) in msg
  assert 'blocks.1.' not in msg and 'fc1.bias' not in msg, msg
