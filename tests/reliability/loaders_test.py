"""Issue 15, loaders: every family's weights go through one validated reader (``interop.state_dict``), so any bad
file (missing, a directory, empty, truncated, random bytes, a zip that is no torch file, a garbage safetensors
header) and any bad value (NaN/inf, integer-stored parameters, a float index buffer) is one error naming the file
and the key; the CLIs turn it into one ``error:`` line."""
import json
import os
import zipfile

import numpy as np
import pytest

from cli_cases import error_line, run_cli_cases
from conftest import SHARED, fixture_dir
from var_jax.interop import bae as ibae
from var_jax.interop import bigr as ibigr
from var_jax.interop import elm as ielm
from var_jax.interop import var as ivar
from var_jax.interop.state_dict import CheckpointFileError, CheckpointMismatchError, load_state_dict, save_state_dict

BITS = SHARED / 'fixtures' / 'elm_bigr_reference'
VAR_DIR = fixture_dir('tiny')
VAE, VAR = VAR_DIR / 'vae.pth', VAR_DIR / 'var.pth'
BAE, ELM, BIGR = BITS / 'bae_k8' / 'binaryae.th', BITS / 'elm_ar_1x8' / 'model.pth', BITS / 'bigr_k8' / 'bigr.pt'


def _margs(name):
  return json.loads((BITS / name / 'config.json').read_text())['model_args']


def _load_var(p):
  from var_jax import VARPipeline
  return VARPipeline.from_torch(VAE, p)


def _load_vqvae(p):
  from var_jax import VARPipeline
  return VARPipeline.from_torch(p, VAR)


# family -> (the released file, the public loader of that family's file)
FAMILIES = {
    'var': (VAR, _load_var),
    'vqvae': (VAE, _load_vqvae),
    'bae': (BAE, lambda p: ibae.load_bae(p)),
    'elm': (ELM, lambda p: ielm.load_elm(p, **_margs('elm_ar_1x8'))),
    'bigr': (BIGR, lambda p: ibigr.load_bigr(p, **_margs('bigr_k8'))),
}


def _bad_file(kind: str, good, tmp_path):
  """A damaged copy of ``good`` (same suffix unless the case is about safetensors) -> (path, what the error says)."""
  suffix = '.safetensors' if kind.startswith('safetensors') else good.suffix
  p = tmp_path / f'{kind}{suffix}'
  data = good.read_bytes()
  if kind == 'truncated':
    p.write_bytes(data[:len(data) // 2])
    why = 'truncated or not a zip archive'
  elif kind == 'random':
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    why = 'not a loadable weights-only torch checkpoint'
  elif kind == 'empty':
    p.write_bytes(b'')
    why = 'empty (0 bytes)'
  elif kind == 'zip':
    with zipfile.ZipFile(p, 'w') as z:
      z.writestr('notes.txt', 'not a torch file')
    why = 'not a loadable weights-only torch checkpoint'
  elif kind == 'directory':
    p.mkdir()
    why = 'is a directory'
  elif kind == 'missing':
    why = 'file not found'
  elif kind == 'safetensors_header':
    p.write_bytes((2 ** 40).to_bytes(8, 'little') + b'{}')
    why = 'header too large'
  elif kind == 'safetensors_random':
    p.write_bytes(np.random.default_rng(1).bytes(4096))
    why = 'not a readable .safetensors file'
  else:
    raise AssertionError(kind)
  return p, why


KINDS = ['truncated', 'random', 'empty', 'zip', 'directory', 'missing', 'safetensors_header', 'safetensors_random']


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_bad_file_is_one_error_naming_it(family, kind, tmp_path):
  good, load = FAMILIES[family]
  path, why = _bad_file(kind, good, tmp_path)
  with pytest.raises((FileNotFoundError, CheckpointFileError)) as e:
    load(path)
  msg = str(e.value)
  assert str(path) in msg and why in msg, msg
  assert len(msg.splitlines()) == 1 and 'Traceback' not in msg, msg


# ----------------------------------------------------------------------------- values
@pytest.fixture(scope='module')
def state_dicts():
  return {'var': load_state_dict(VAR), 'vqvae': load_state_dict(VAE), 'bae': load_state_dict(BAE),
          'elm': load_state_dict(ELM), 'bigr': load_state_dict(BIGR, wrapper_key='ema')}


def _import(family, sd, allow_cast=False):
  if family == 'var':
    return ivar.import_var(sd, ivar.var_config_from_state_dict(sd), allow_cast=allow_cast)
  if family == 'vqvae':
    pn = ivar.var_config_from_state_dict(load_state_dict(VAR)).patch_nums
    return ivar.import_vae(sd, ivar.vae_config_from_state_dict(sd, patch_nums=pn), allow_cast=allow_cast)
  if family == 'bae':
    own, _ = ibae.split_bae_state_dict(sd)
    return ibae.import_bae(sd, ibae.bae_config_from_state_dict(own), allow_cast=allow_cast)
  if family == 'elm':
    return ielm.import_elm(sd, ielm.infer_elm_config(sd, **_margs('elm_ar_1x8')), allow_cast=allow_cast)
  return ibigr.import_bigr(sd, ibigr.bigr_config_from_state_dict(sd, **_margs('bigr_k8')), allow_cast=allow_cast)


# a stored parameter of each family (its name in the error: the BAE's without the file's 'ae.' prefix)
VICTIM = {'var': ('blocks.0.ffn.fc1.weight',) * 2, 'vqvae': ('encoder.conv_in.weight',) * 2,
          'bae': ('ae.encoder.blocks.0.weight', 'encoder.blocks.0.weight'),
          'elm': ('layers.0.attention.wqkv.weight',) * 2, 'bigr': ('mask_tok',) * 2}


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_non_finite_weights_name_the_key_and_count(family, value, state_dicts):
  key, shown = VICTIM[family]
  sd = dict(state_dicts[family])
  a = np.array(sd[key])
  a.reshape(-1)[:3] = value
  sd[key] = a
  for allow_cast in (False, True):                  # casting never admits NaN/inf
    with pytest.raises(CheckpointMismatchError, match=rf"'{shown}' holds 3 non-finite values \(NaN/inf\)") as e:
      _import(family, sd, allow_cast)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize('dtype', [np.uint8, np.int32])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_integer_weights_name_key_dtype_and_expected(family, dtype, state_dicts):
  key, shown = VICTIM[family]
  sd = dict(state_dicts[family])
  sd[key] = np.clip(np.round(sd[key] * 10), 0, 255).astype(dtype)
  with pytest.raises(CheckpointMismatchError) as e:
    _import(family, sd)
  msg = str(e.value)
  assert f"'{shown}' is stored as {np.dtype(dtype).name}, expected a floating dtype (float32)" in msg, msg
  assert 'allow_cast' in msg and len(msg.splitlines()) == 1
  v = _import(family, sd, allow_cast=True)           # the explicit opt-in casts (to float32)
  leaves = [np.asarray(x) for x in __import__('jax').tree.leaves(v)]
  assert all(x.dtype == np.float32 for x in leaves if x.dtype.kind == 'f')


def test_float_index_buffer_is_named(state_dicts, tmp_path):
  sd = dict(state_dicts['var'])
  sd['lvl_1L'] = sd['lvl_1L'].astype(np.float32)      # was: numpy's "Cannot cast array data from float32 to int64"
  with pytest.raises(CheckpointMismatchError, match=r"'lvl_1L' is stored as float32, expected an integer buffer"):
    _import('var', sd)
  p = tmp_path / 'var.safetensors'
  save_state_dict(sd, p)
  with pytest.raises(CheckpointMismatchError, match=rf"{p}: VAR: key 'lvl_1L' is stored as float32"):
    _load_var(p)


def test_bad_weights_through_the_pipelines(state_dicts, tmp_path):
  """The pipelines read through the same checks (the file named): VAR, and ELM / BiGR with their BAE."""
  from var_jax.pipelines.pretrained import load_pipeline
  for family, p in (('var', tmp_path / 'var.safetensors'), ('elm', tmp_path / 'elm.safetensors'),
                    ('bigr', tmp_path / 'bigr.safetensors')):
    key, _ = VICTIM[family]
    sd = dict(state_dicts[family])
    sd[key] = np.full_like(sd[key], np.nan)
    save_state_dict(sd, p)
    with pytest.raises(CheckpointMismatchError) as e:
      if family == 'var':
        load_pipeline(str(VAE), str(p))
      else:
        load_pipeline(bae_ckpt=str(BAE), model_ckpt=str(p), model_args=_margs('elm_ar_1x8' if family == 'elm'
                                                                               else 'bigr_k8'))
    assert str(p) in str(e.value) and f"'{key}' holds {sd[key].size} non-finite" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- the CLI
def test_sample_cli_loader_errors_are_one_line(tmp_path):
  """python -m var_jax.sample with bad weight files of each family: exit 1, one ``error:`` line naming the file,
  no traceback, no output written."""
  def bad(kind, good):
    d = tmp_path / f'{kind}_{good.stem}'
    d.mkdir()
    return _bad_file(kind, good, d)[0]
  trunc_var, empty_vae, rand_bae = bad('truncated', VAR), bad('empty', VAE), bad('random', BAE)
  hdr_elm, zip_bigr = bad('safetensors_header', ELM), bad('zip', BIGR)
  sd = load_state_dict(ELM)
  sd['tok_embedder.weight'] = sd['tok_embedder.weight'].astype(np.uint8)
  u8_elm = tmp_path / 'u8_elm.safetensors'
  save_state_dict(sd, u8_elm)
  out = tmp_path / 'out' / 'grid.png'
  margs = ','.join(f'{k}={json.dumps(v)}' for k, v in _margs('elm_ar_1x8').items() if k in ('n_head', 'block_size'))
  cases = {
      trunc_var: [f'--vae_ckpt={VAE}', f'--var_ckpt={trunc_var}'],
      empty_vae: [f'--vae_ckpt={empty_vae}', f'--var_ckpt={VAR}'],
      rand_bae: [f'--bae_ckpt={rand_bae}', f'--model_ckpt={ELM}'],
      hdr_elm: [f'--bae_ckpt={BAE}', f'--model_ckpt={hdr_elm}'],
      zip_bigr: [f'--bae_ckpt={BAE}', f'--model_ckpt={zip_bigr}'],
      u8_elm: [f'--bae_ckpt={BAE}', f'--model_ckpt={u8_elm}', f'--model_args={margs}'],
      tmp_path / 'nope.pth': [f'--vae_ckpt={VAE}', f'--var_ckpt={tmp_path / "nope.pth"}'],
  }
  results = run_cli_cases([['var_jax.sample', *a, f'--out={out}', '--classes=1'] for a in cases.values()],
                          tmp_path)
  for (path, _), r in zip(cases.items(), results):
    line = error_line(r)
    assert str(path) in line, line
  assert "'tok_embedder.weight' is stored as uint8" in error_line(results[5])
  assert not out.exists()


# ----------------------------------------------------------------------------- our own model checkpoints
@pytest.fixture(scope='module')
def own_checkpoints(tmp_path_factory):
  """A model checkpoint directory of the tiny VAR, and one of the same model with NaN weights."""
  import jax
  from var_jax import VARPipeline
  d = tmp_path_factory.mktemp('own')
  pipe = _load_var(VAR)
  pipe.save_checkpoint(d / 'good')
  v = jax.tree.map(np.array, jax.device_get(pipe.var_variables))
  v['params']['head']['kernel'][0, :2] = np.nan
  VARPipeline(pipe.vae_config, pipe.var_config, pipe.vae_variables, v).save_checkpoint(d / 'nan')
  return d


@pytest.mark.slow        # two orbax saves and three restores
def test_own_checkpoint_damage_is_one_error(own_checkpoints, tmp_path):
  import shutil
  from var_jax import VARPipeline
  with pytest.raises(CheckpointMismatchError, match=r"nan: bad weights: 'var/params/head/kernel' holds 2 non-finite"):
    VARPipeline.from_checkpoint(own_checkpoints / 'nan')
  bad_json = tmp_path / 'json'
  shutil.copytree(own_checkpoints / 'good', bad_json)
  (bad_json / 'config.json').write_text('{"vae": ')
  with pytest.raises(ValueError, match=r'config.json: not valid JSON') as e:
    VARPipeline.from_checkpoint(bad_json)
  assert len(str(e.value).splitlines()) == 1
  damaged = tmp_path / 'params'
  shutil.copytree(own_checkpoints / 'good', damaged)
  for root, _, files in os.walk(damaged / 'params'):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'r+b') as fh:
        fh.truncate(os.path.getsize(p) // 3)
  with pytest.raises(CheckpointFileError, match=rf'{damaged}: params/ cannot be restored') as e:
    VARPipeline.from_checkpoint(damaged)
  assert len(str(e.value).splitlines()) == 1
