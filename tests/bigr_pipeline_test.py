"""BiGRPipeline against the reference fixtures (bae_k8 + bigr_k8): encode, decode, features, sampling, export."""
import inspect
import json

import jax
import numpy as np
import pytest
import torch

from conftest import SHARED, nchw_to_nhwc, rel_err
from var_jax.sampling import bigr as bs
from var_jax.pipelines.bigr import RELEASE_SAMPLING, BiGRPipeline

REF = SHARED / 'fixtures' / 'elm_bigr_reference'
BAE_FIX, BIGR_FIX = REF / 'bae_k8', REF / 'bigr_k8'


@pytest.fixture(scope='module')
def ref():
  cj = json.loads((BIGR_FIX / 'config.json').read_text())
  pipe = BiGRPipeline.from_torch(BAE_FIX / 'binaryae.th', BIGR_FIX / 'bigr.pt', **cj['model_args'])
  return pipe, dict(np.load(BAE_FIX / 'io.npz')), dict(np.load(BIGR_FIX / 'io.npz')), cj


def _settings(cj):
  return dict(cfg=cj['cfg_scale'], num_iter=cj['num_iter'], cfg_schedule=cj['cfg_schedule'],
              gumbel_temp=cj['gumbel_temp'], gumbel_schedule=cj['gumbel_schedule'])


def test_configs_inferred(ref):
  pipe, _, _, cj = ref
  assert pipe.bigr_config.model_args() == cj['model_args']
  bae_cj = json.loads((BAE_FIX / 'config.json').read_text())
  c = pipe.bae_config
  assert (c.nf, c.ch_mult, c.res_blocks, c.codebook_size, c.emb_dim, c.norm_first) == (
      bae_cj['nf'], tuple(bae_cj['ch_mult']), bae_cj['res_blocks'], bae_cj['codebook_size'], bae_cj['emb_dim'],
      bae_cj['norm_first'])
  # resolution follows from BiGR's 4x4 grid and the BAE's downsampling, which names the attention level correctly
  assert (c.resolution, c.attn_resolutions) == (bae_cj['img_size'], tuple(bae_cj['attn_resolutions']))
  assert (pipe.image_size, pipe.latent_size, pipe.num_layers, pipe.feature_dim) == (64, 4, 3, 64)


def test_encode_threshold_matches_fixture(ref):
  pipe, bae_io, io, _ = ref
  bits = np.asarray(pipe.encode(nchw_to_nhwc(bae_io['image'])))
  assert bits.dtype == np.uint8 and bits.shape == (2, 4, 4, 8)
  np.testing.assert_array_equal(bits, nchw_to_nhwc(bae_io['bits_det']))
  np.testing.assert_array_equal(bits, nchw_to_nhwc(io['bits']))          # BiGR's input code is the BAE's code
  # the reference inp (B, N, K) is the NHWC bits in raster order
  np.testing.assert_array_equal(bits.reshape(2, 16, 8), io['inp'])


def test_encode_bernoulli_per_image_keys(ref):
  pipe, bae_io, _, _ = ref
  img = nchw_to_nhwc(bae_io['image'])
  probs = nchw_to_nhwc(bae_io['probs'])
  n = 64
  many = np.asarray(pipe.encode(np.repeat(img, n, axis=0), mode='bernoulli', rng=3))   # image i*n+j: key i*n+j
  assert many.dtype == np.uint8 and set(np.unique(many)) <= {0, 1}
  dev = np.abs(many.reshape(2, n, 4, 4, 8).mean(1) - probs)                          # E[bit] = p
  assert dev.mean() < 0.08 and dev.max() < 0.3, (dev.mean(), dev.max())             # |1 - 2p| averages ~0.3
  # image i depends only on fold_in(rng, i): a prefix of the batch gives the same bits
  np.testing.assert_array_equal(np.asarray(pipe.encode(img[:1], mode='bernoulli', rng=3)), many[:1])
  with pytest.raises(ValueError, match='rng'):
    pipe.encode(img, mode='bernoulli')


def test_decode_matches_fixture(ref):
  pipe, bae_io, _, _ = ref
  out = np.asarray(pipe.decode(nchw_to_nhwc(bae_io['bits_det'])))
  assert rel_err(out, nchw_to_nhwc(bae_io['recon_det'])) < 1e-4
  clipped = np.asarray(pipe.decode(nchw_to_nhwc(bae_io['bits_det']), clip=True))
  np.testing.assert_array_equal(clipped, np.clip(out, 0.0, 1.0))


@pytest.mark.parametrize('condition', ['null', 'label'])
def test_features_every_layer_match_fixture(ref, condition):
  pipe, bae_io, io, _ = ref
  label = None if condition == 'null' else io['labels']
  img = nchw_to_nhwc(bae_io['image'])
  want = np.stack([io[f'probe_{condition}_layer{l}'] for l in range(3)], axis=1)    # (B, L, D)
  from_images = np.asarray(pipe.features(img, label=label))
  from_bits = np.asarray(pipe.features(nchw_to_nhwc(io['bits']), label=label))     # uint8 (B, h, w, K)
  from_inp = np.asarray(pipe.features(io['inp'], label=label))                     # float (B, N, K)
  for got in (from_images, from_bits, from_inp):
    assert got.shape == (2, 3, 64) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 1e-4, np.max(np.abs(got - want))
  for l in range(3):
    one = np.asarray(pipe.features(img, layer=l, label=label))
    assert one.shape == (2, 64)
    assert np.max(np.abs(one - want[:, l])) < 1e-4
  # the fixture's null and label features differ: the condition matters
  assert np.max(np.abs(io['probe_null_layer2'] - io['probe_label_layer2'])) > 1e-3


def test_features_label_forms_and_errors(ref):
  pipe, bae_io, io, _ = ref
  img = nchw_to_nhwc(bae_io['image'])
  np.testing.assert_array_equal(np.asarray(pipe.features(img, label=pipe.null_class)),
                                np.asarray(pipe.features(img)))
  with pytest.raises(ValueError, match='layer'):
    pipe.features(img, layer=3)
  with pytest.raises(ValueError, match='class labels'):
    pipe.features(img, label=[0, 11])
  with pytest.raises(ValueError, match='64x64'):
    pipe.encode(np.zeros((1, 32, 32, 3), np.float32))


def test_sample_with_injected_noise_matches_fixture(ref):
  pipe, _, io, cj = ref
  noise = {'u_diff': io['sample_u_diff'], 'u_select': io['sample_u_select'], 'gumbel': io['sample_gumbel']}
  images, bits = pipe.sample(io['labels'], noise=noise, clip=False, **_settings(cj))   # infer_steps: config's 10
  assert bits.shape == (2, 4, 4, 8) and bits.dtype == np.uint8
  np.testing.assert_array_equal(bits.reshape(2, 16, 8), io['sample_bits'])
  assert rel_err(images, nchw_to_nhwc(io['sample_image'])) < 1e-4
  # decode(sample bits) is the same image
  assert rel_err(np.asarray(pipe.decode(bits)), nchw_to_nhwc(io['sample_image'])) < 1e-4


def test_sample_per_sample_keys(ref):
  """Sample i is bigr_sampling.generate run alone with fold_in(rng, i), whatever the batching or sharding."""
  pipe, _, _, cj = ref
  s = _settings(cj)
  labels = [3, 7, 10]                                     # 10: the null class (unconditional)
  key = jax.random.key(5)
  img1, bits1 = pipe.sample(labels, key, batch_size=1, shard=False, **s)
  img8, bits8 = pipe.sample(labels, key, **s)              # sharded over the 8 test devices, padded 3 -> 8
  assert img1.shape == (3, 64, 64, 3) and bits1.shape == (3, 4, 4, 8)
  np.testing.assert_array_equal(bits1, bits8)
  np.testing.assert_allclose(img1, img8, atol=1e-5)
  assert img1.min() >= 0.0 and img1.max() <= 1.0
  out = bs.generate(pipe.bigr, pipe.bigr_variables, [labels[1]], rng=jax.random.fold_in(key, 1),
                    num_iter=s['num_iter'], cfg_scale=s['cfg'], cfg_schedule=s['cfg_schedule'],
                    gumbel_temp=s['gumbel_temp'], gumbel_schedule=s['gumbel_schedule'])
  np.testing.assert_array_equal(np.asarray(out['bits'])[0], bits1[1].reshape(16, 8))
  # sample_ids: a resumed job reproduces the tail; another seed gives other bits
  _, tail = pipe.sample(labels[1:], key, batch_size=1, shard=False, sample_ids=[1, 2], **s)
  np.testing.assert_array_equal(tail, bits1[1:])
  _, other = pipe.sample(labels, 6, batch_size=1, shard=False, **s)
  assert not np.array_equal(other, bits1)


def test_sample_defaults_are_the_release_script():
  sig = inspect.signature(BiGRPipeline.sample).parameters
  assert RELEASE_SAMPLING == dict(cfg=3.0, num_iter=20, gumbel_temp=0.01, gumbel_schedule='constant',
                                  cfg_schedule='constant', infer_steps=100, temperature=1.0)
  for name in ('cfg', 'num_iter', 'gumbel_temp', 'gumbel_schedule', 'cfg_schedule'):
    assert sig[name].default == RELEASE_SAMPLING[name], name
  # infer_steps / temperature default to the ModelArgs, whose defaults are the release's
  from var_jax.models.bigr import BiGRConfig
  assert (BiGRConfig.infer_steps, BiGRConfig.n_sample_steps, BiGRConfig.sample_temperature) == (100, 256, 1.0)
  assert sig['infer_steps'].default is None and sig['temperature'].default is None


def test_sample_argument_errors(ref):
  pipe, _, _, _ = ref
  with pytest.raises(ValueError, match='out of range'):
    pipe.sample([11], 0, num_iter=2, infer_steps=2)
  with pytest.raises(ValueError, match='infer_steps'):
    pipe.sample([1], 0, infer_steps=257)
  with pytest.raises(ValueError, match='rng'):
    pipe.sample([1])


def test_save_torch_roundtrip(ref, tmp_path):
  pipe, _, _, cj = ref
  pipe.save_torch(tmp_path / 'binaryae.th', tmp_path / 'bigr.pt')
  for name, unwrap in (('binaryae.th', lambda d: d), ('bigr.pt', lambda d: d['ema'])):
    src = BAE_FIX / name if name == 'binaryae.th' else BIGR_FIX / name
    a = unwrap(torch.load(src, map_location='cpu', weights_only=True))
    b = unwrap(torch.load(tmp_path / name, map_location='cpu', weights_only=True))
    assert list(a) == list(b), name
    for k in a:
      assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (name, k)
  back = BiGRPipeline.from_torch(tmp_path / 'binaryae.th', tmp_path / 'bigr.pt', **cj['model_args'])
  assert back.bae_config == pipe.bae_config and back.bigr_config == pipe.bigr_config
  for x, y in ((back.bae_variables, pipe.bae_variables), (back.bigr_variables, pipe.bigr_variables)):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), x, y)

