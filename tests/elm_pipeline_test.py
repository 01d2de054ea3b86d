"""ELMPipeline on the reference fixtures: checkpoint loading (AR / MLM from the keys, model_args checked), encode ->
tokens, teacher-forced logits, sampling (injected noise = the fixtures; keyed: deterministic, independent of the
batch size, the padding and the device count), and the export round trip."""
import json

import jax
import numpy as np
import pytest
import torch

from conftest import SHARED, nchw_to_nhwc
from var_jax.pipelines.elm import ELMPipeline
from var_jax.interop.state_dict import CheckpointMismatchError

REF = SHARED / 'fixtures' / 'elm_bigr_reference'
BAE_PATH = REF / 'bae_k8' / 'binaryae.th'
NAMES = ('elm_ar_1x8', 'elm_ar_2x4', 'elm_mlm_1x8', 'elm_mlm_2x4')
TOL = 1e-4
_CACHE = {}


def _load(name):
  if name not in _CACHE:
    d = REF / name
    cj = json.loads((d / 'config.json').read_text())
    pipe = ELMPipeline.from_torch(BAE_PATH, d / 'model.pth', **cj['model_args'])
    _CACHE[name] = pipe, dict(np.load(d / 'io.npz')), cj
  return _CACHE[name]


def _maxdiff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize('name', NAMES)
def test_load_encode_logits(name):
  pipe, io, cj = _load(name)
  assert pipe.modeling == name.split('_')[1]
  assert (pipe.image_size, pipe.latent_size, pipe.seq_len) == (64, 4, 16)
  if name in ('elm_ar_1x8', 'elm_mlm_2x4'):           # the same BAE and image in all four: encode twice
    image = nchw_to_nhwc(np.load(REF / 'bae_k8' / 'io.npz')['image'])
    bits = pipe.encode(image)
    assert bits.dtype == np.uint8 and bits.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(np.asarray(bits), nchw_to_nhwc(io['bits']))
    np.testing.assert_array_equal(np.asarray(pipe.tokenize(image)), io['tokens'])
  np.testing.assert_array_equal(np.asarray(pipe.bits_to_tokens(nchw_to_nhwc(io['bits']))), io['tokens'])
  np.testing.assert_array_equal(np.asarray(pipe.tokens_to_bits(io['tokens'])), nchw_to_nhwc(io['bits']))
  null = np.full_like(io['labels'], pipe.null_class)
  if pipe.modeling == 'ar':
    assert _maxdiff(pipe.logits(io['labels'], io['tokens']), io['logits']) < TOL
    assert _maxdiff(pipe.logits(null, io['tokens']), io['logits_null']) < TOL
  else:
    mask = io['token_all_mask']
    assert _maxdiff(pipe.logits(io['labels'], io['tokens'], mask), io['logits']) < TOL
    assert _maxdiff(pipe.logits(null, io['masked_input_ids']), io['logits_null']) < TOL


@pytest.mark.parametrize('name', ('elm_ar_1x8', 'elm_mlm_2x4'))   # all four: tests/elm_sampling_test.py
def test_sample_with_injected_noise_matches_reference(name):
  pipe, io, cj = _load(name)
  if pipe.modeling == 'ar':
    kw = dict(cfg=cj['cfg_scale'], cfg_schedule=cj['cfg_schedule'], temperature=cj['sample_temperature'],
              top_k=cj['sample_top_k'], noise={'uniforms': io['topk_uniforms']})
    want_tokens, want_image = io['topk_tokens'], io['topk_image']
  else:
    kw = dict(cfg=cj['cfg_scale'], cfg_schedule=cj['cfg_schedule'], temperature=cj['sample_temperature'],
              num_iter=cj['num_iter'], noise={'uniforms': io['sample_uniforms'], 'gumbel': io['sample_gumbel']})
    want_tokens, want_image = io['sample_tokens'], io['sample_image']
  images, tokens = pipe.sample(io['labels'], clip=False, **kw)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert _maxdiff(images, nchw_to_nhwc(want_image)) < TOL
  assert images.min() < 0 or images.max() > 1         # random weights: the raw decoder output is not in [0, 1]


@pytest.mark.parametrize('name', ('elm_ar_2x4', 'elm_mlm_1x8'))
def test_sample_determinism_and_batch_invariance(name):
  pipe, io, cj = _load(name)
  assert jax.local_device_count() == 8
  labels = np.array([0, 3, 3, 7, 10], np.int32)
  kw = dict(cfg=3.0, temperature=1.2, top_k=6) if pipe.modeling == 'ar' else dict(cfg=2.0, num_iter=4)
  images, tokens = pipe.sample(labels, 5, **kw)                       # one batch, sharded over 8 devices (padded)
  assert images.shape == (5, 64, 64, 3) and tokens.shape == (5, 16, pipe.token_each)
  assert images.min() >= 0 and images.max() <= 1                     # clip=True by default
  assert tokens.min() >= 0 and tokens.max() < pipe.codebook_size
  assert not np.array_equal(tokens[1], tokens[2])                     # same label, own keys
  im2, tok2 = pipe.sample(labels, jax.random.key(5), batch_size=2, shard=False, **kw)   # 3 batches, last padded
  np.testing.assert_array_equal(tok2, tokens)
  np.testing.assert_allclose(im2, images, atol=1e-5)
  _, tok3 = pipe.sample(labels[3:], 5, sample_ids=[3, 4], shard=False, **kw)
  np.testing.assert_array_equal(tok3, tokens[3:])
  _, tok4 = pipe.sample(labels, 6, **kw)
  assert not np.array_equal(tok4, tokens)
  # compiled samplers are cached: another call with the same settings adds nothing
  n_jit = len(pipe._jit_cache)
  pipe.sample(labels, 7, **kw)
  assert len(pipe._jit_cache) == n_jit


def test_random_labels_and_argument_checks():
  pipe, io, cj = _load('elm_ar_2x4')
  _, tokens = pipe.sample(None, 0, num_samples=3, batch_size=2, shard=False, cfg=3.0, temperature=1.2, top_k=6)
  assert tokens.shape == (3, 16, 2)
  with pytest.raises(ValueError, match='num_iter'):
    pipe.sample([1], 0, num_iter=3)
  with pytest.raises(ValueError, match='cfg_schedule'):
    pipe.sample([1], 0, cfg_schedule='powercos')
  with pytest.raises(ValueError, match='class label'):
    pipe.sample([11], 0)
  with pytest.raises(ValueError, match='tokens'):
    pipe.logits([1, 2], io['tokens'][:, :5])
  with pytest.raises(ValueError, match='64x64'):
    pipe.encode(np.zeros((1, 32, 32, 3), np.float32))
  mlm, _, _ = _load('elm_mlm_2x4')
  with pytest.raises(ValueError, match='cfg_schedule'):
    mlm.sample([1], 0, cfg_schedule='cos')


def test_model_args_checked():
  d = REF / 'elm_ar_2x4'
  args = json.loads((d / 'config.json').read_text())['model_args']
  with pytest.raises(CheckpointMismatchError, match='dim'):
    ELMPipeline.from_torch(BAE_PATH, d / 'model.pth', **dict(args, dim=128))
  with pytest.raises(CheckpointMismatchError, match='code_dim'):
    ELMPipeline.from_torch(BAE_PATH, d / 'model.pth', **dict(args, code_dim=8))
  with pytest.raises(TypeError, match='no_such_field'):
    ELMPipeline.from_torch(BAE_PATH, d / 'model.pth', **dict(args, no_such_field=1))


@pytest.mark.parametrize('name', ('elm_ar_2x4', 'elm_mlm_1x8'))
def test_save_torch_round_trip(name, tmp_path):
  pipe, io, cj = _load(name)
  bae_out, model_out = tmp_path / 'binaryae.th', tmp_path / 'model.pth'
  pipe.save_torch(bae_out, model_out)
  want = torch.load(REF / name / 'model.pth', map_location='cpu', weights_only=True)
  got = torch.load(model_out, map_location='cpu', weights_only=True)
  assert list(got) == list(want)                      # every key (the MLM's unused ones too), reference order
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
  bae_want = torch.load(BAE_PATH, map_location='cpu', weights_only=True)
  bae_got = torch.load(bae_out, map_location='cpu', weights_only=True)
  assert set(bae_got) == set(bae_want)
  for k in bae_want:
    np.testing.assert_array_equal(bae_got[k].numpy(), bae_want[k].numpy(), err_msg=k)
  again = ELMPipeline.from_torch(bae_out, model_out, **cj['model_args'])
  assert again.elm_config == pipe.elm_config and again.bae_config == pipe.bae_config
  tokens = io['tokens']
  mask = io['token_all_mask'] if pipe.modeling == 'mlm' else None
  np.testing.assert_array_equal(np.asarray(again.logits(io['labels'], tokens, mask)),
                                np.asarray(pipe.logits(io['labels'], tokens, mask)))
