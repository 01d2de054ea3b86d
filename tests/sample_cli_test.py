"""The sampling CLI: outputs, FID-evaluator npz, resumability, errors; and our model checkpoint round trip."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, fixture_dir
from var_jax import VARPipeline
from var_jax.eval import protocol
from var_jax.images import to_uint8
from var_jax.pipelines import pretrained


@pytest.fixture(scope='module')
def tiny_pipe():
  d = fixture_dir('tiny')
  return VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')


def test_out_dir_npz_and_resume(tmp_path, tiny_pipe):
  labels = protocol.sample_plan(10, ['1', '4', '9'], 2)
  assert labels == [1, 1, 4, 4, 9, 9]
  out_dir = tmp_path / 'samples'
  n = protocol.write_samples(tiny_pipe, labels, seed=3, cfg=1.5, top_k=10, top_p=0.9, more_smooth=False,
                             batch_size=4, dtype='float32', out=str(tmp_path / 'grid.png'), out_dir=str(out_dir))
  assert n == 6
  files = sorted(f for f in os.listdir(out_dir) if f.endswith('.png'))
  assert files == [protocol.image_name(i, l) for i, l in enumerate(labels)]
  npz = np.load(out_dir / 'samples.npz')
  assert npz['arr_0'].dtype == np.uint8 and npz['arr_0'].shape == (6, 64, 64, 3)
  first = {f: (out_dir / f).read_bytes() for f in files}
  grid = Image.open(tmp_path / 'grid.png')
  assert grid.size == (6 * 64, 64)
  # kill two images and resume with another batch size: only those are redrawn, identically
  os.remove(out_dir / files[1])
  os.remove(out_dir / files[4])
  n = protocol.write_samples(tiny_pipe, labels, seed=3, cfg=1.5, top_k=10, top_p=0.9, more_smooth=False,
                             batch_size=1, dtype='float32', out_dir=str(out_dir))
  assert n == 2
  for f in files:
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / f)), np.asarray(Image.open(
        __import__('io').BytesIO(first[f]))), err_msg=f)
  np.testing.assert_array_equal(np.load(out_dir / 'samples.npz')['arr_0'], npz['arr_0'])


def test_plan_errors():
  with pytest.raises(ValueError, match=r'class 11 is out of range.*10 classes.*10 = unconditional'):
    protocol.sample_plan(10, ['11'], 1)
  assert protocol.sample_plan(10, ['10'], 1) == [10]      # num_classes: the unconditional class, as in the API
  with pytest.raises(ValueError, match='num_per_class'):
    protocol.sample_plan(10, None, 0)
  assert protocol.sample_plan(3, None, 2) == [0, 0, 1, 1, 2, 2]


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match='not both'):
    pretrained.load_pipeline('a.pth', 'b.pth', str(tmp_path))
  with pytest.raises(ValueError, match='give --checkpoint'):
    pretrained.load_pipeline('a.pth', None, None)
  with pytest.raises(FileNotFoundError, match='not a var_jax model checkpoint'):
    pretrained.load_pipeline(checkpoint=str(tmp_path))


def test_checkpoint_roundtrip(tmp_path, tiny_pipe):
  path = tmp_path / 'model'
  tiny_pipe.save_checkpoint(path)
  back = VARPipeline.from_checkpoint(path)
  assert back.vae_config == tiny_pipe.vae_config and back.var_config == tiny_pipe.var_config
  import jax
  for a, b in [(tiny_pipe.vae_variables, back.vae_variables), (tiny_pipe.var_variables, back.var_variables)]:
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  tiny_pipe.save_checkpoint(path)            # overwriting a checkpoint is fine
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'data.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='not a var_jax model checkpoint'):
    tiny_pipe.save_checkpoint(tmp_path / 'other')
  assert (tmp_path / 'other' / 'data.txt').read_text() == 'keep me'


def test_cli_end_to_end(tmp_path):
  d = fixture_dir('tiny')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'var_jax.sample', f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}',
         '--classes=0,5', f'--out={tmp_path / "g.png"}', '--top_k=5']
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / 'g.png').exists() and 'images/s' in r.stderr
  bad = subprocess.run(cmd[:-3] + ['--classes=0,99', f'--out={tmp_path / "x.png"}'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'class 99 is out of range' in bad.stderr
  assert not (tmp_path / 'x.png').exists()


# ----------------------------------------------------------------------------- ELM / BiGR through the same CLI
def _bits_fixture(name):
  import json
  from conftest import SHARED
  d = SHARED / 'fixtures' / 'elm_bigr_reference'
  cfg = json.loads((d / name / 'config.json').read_text())
  ckpt = next(p for p in (d / name).iterdir() if p.suffix in ('.pth', '.pt'))
  return d / 'bae_k8' / 'binaryae.th', ckpt, cfg['model_args']


@pytest.mark.parametrize('name,family', [('elm_ar_2x4', 'elm'), ('elm_mlm_2x4', 'elm'), ('bigr_k8', 'bigr')])
def test_bits_models_through_the_cli(tmp_path, name, family):
  bae, ckpt, margs = _bits_fixture(name)
  assert pretrained.detect_family(str(ckpt)) == family
  args = [f'{k}={json.dumps(v)}' for k, v in margs.items()]
  pipe = pretrained.load_pipeline(bae_ckpt=str(bae), model_ckpt=str(ckpt), model_args=pretrained.parse_model_args(args))
  assert pipe.family == family and pipe.num_classes == 10
  labels = protocol.sample_plan(10, ['3', '7'], 2)
  extra = {'num_iter': 4} if family != 'elm' or 'mlm' in name else {}
  if family == 'bigr':
    extra['infer_steps'] = 5
  out_dir = tmp_path / 's'
  n = protocol.write_samples(pipe, labels, 0, None, 5 if family == 'elm' else None, None, False, 4, 'float32',
                             out=str(tmp_path / 'grid.png'), out_dir=str(out_dir), options=extra)
  assert n == 4
  arr = np.load(out_dir / 'samples.npz')['arr_0']
  assert arr.shape == (4, 64, 64, 3) and arr.dtype == np.uint8
  # the same images as the pipeline draws directly with the family's defaults (per-image keys)
  opts = protocol.sampling_options(family, top_k=5 if family == 'elm' else None, **extra)
  imgs, _ = pipe.sample(labels, 0, sample_ids=list(range(4)), batch_size=4, **opts)
  np.testing.assert_array_equal(arr, to_uint8(imgs))


def test_sampling_options_per_family():
  assert protocol.sampling_options('var') == {'cfg': 1.5, 'top_k': 900, 'top_p': 0.96, 'more_smooth': False}
  assert protocol.sampling_options('elm', cfg_schedule='cos') == {'cfg': 4.0, 'top_k': 1000, 'cfg_schedule': 'cos'}
  assert protocol.sampling_options('bigr', cfg=2.0, gumbel_temp=0.5) == {'cfg': 2.0, 'gumbel_temp': 0.5}
  with pytest.raises(ValueError, match='--top_p do not apply to ELM'):
    protocol.sampling_options('elm', top_p=0.9)
  with pytest.raises(ValueError, match='--top_k do not apply to BIGR'):
    protocol.sampling_options('bigr', top_k=10)
  with pytest.raises(ValueError, match='--gumbel_temp do not apply to VAR'):
    protocol.sampling_options('var', gumbel_temp=0.1)
  assert pretrained.parse_model_args(['n_head=4', 'p_flip=true', 'name=x']) == {'n_head': 4, 'p_flip': True,
                                                                                'name': 'x'}
  with pytest.raises(ValueError, match='key=value'):
    pretrained.parse_model_args(['n_head'])
