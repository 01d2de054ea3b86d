"""The VQVAE and quantizer against the reference implementation's outputs (tiny, tiny_saln fixtures)."""
import numpy as np

from conftest import nchw_to_nhwc, rel_err

TOL = 1e-4


def test_encoder_features(reference_model):
  _, pipe, io, _ = reference_model
  f = pipe.encode_features(nchw_to_nhwc(io['image']))
  assert rel_err(f, nchw_to_nhwc(io['encoder_f'])) < TOL


def test_tokens_exact_every_scale(reference_model):
  _, pipe, io, cfg = reference_model
  toks = pipe.encode(nchw_to_nhwc(io['image']))
  assert len(toks) == len(cfg['patch_nums'])
  for k, t in enumerate(toks):
    assert t.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(t), io[f'idx_scale{k}'], err_msg=f'scale {k}')
  np.testing.assert_array_equal(np.concatenate([np.asarray(t) for t in toks], 1), io['tokens'])


def test_fhat_every_scale(reference_model):
  _, pipe, io, cfg = reference_model
  fhats = pipe.fhats(nchw_to_nhwc(io['image']))
  for k, f in enumerate(fhats):
    assert rel_err(f, nchw_to_nhwc(io[f'fhat_scale{k}'])) < TOL, f'scale {k}'


def test_reconstruction(reference_model):
  _, pipe, io, _ = reference_model
  rec = pipe.reconstruct(nchw_to_nhwc(io['image']))
  assert rel_err(rec, nchw_to_nhwc(io['recon'])) < TOL
  assert float(np.max(np.abs(rec))) <= 1.0


def test_decode_from_tokens_equals_reconstruction(reference_model):
  _, pipe, io, _ = reference_model
  rec = pipe.decode(io['tokens'])
  assert rel_err(rec, nchw_to_nhwc(io['recon'])) < TOL


def test_teacher_forcing_input(reference_model):
  _, pipe, io, _ = reference_model
  assert rel_err(pipe.var_input(io['tokens']), io['var_input']) < TOL
