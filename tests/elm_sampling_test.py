"""ELM generation against the reference fixtures (Pepper-lll/LMforImageGeneration ``generate_cfg``, run in torch with
injected uniforms / Gumbel noise), the MLM masking schedule table, the CFG schedules in closed form, and KV-cache AR
sampling against a prefix-recomputing loop (the reference's way)."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED, nchw_to_nhwc
from var_jax.sampling import elm as es
from var_jax.sampling.common import filter_top_k_top_p, per_sample_keys
from var_jax.interop import bae as ibae
from var_jax.interop import elm as ie
from var_jax.models import elm as E
from var_jax.models.bae import BinaryAutoEncoder

REF = SHARED / 'fixtures' / 'elm_bigr_reference'
AR = ('elm_ar_1x8', 'elm_ar_2x4')
MLM = ('elm_mlm_1x8', 'elm_mlm_2x4')
IMAGE_TOL = 1e-4
_CACHE = {}


def _fixture(name):
  """(model, variables, io, config.json)."""
  if name not in _CACHE:
    d = REF / name
    if not d.is_dir():
      raise FileNotFoundError(f'ELM fixtures not found at {d}')
    cj = json.loads((d / 'config.json').read_text())
    model, variables = ie.load_elm(d / 'model.pth', **cj['model_args'])
    _CACHE[name] = model, variables, dict(np.load(d / 'io.npz')), cj
  return _CACHE[name]


@pytest.fixture(scope='module')
def bae():
  if 'bae' not in _CACHE:
    cfg, variables, _ = ibae.load_bae(str(REF / 'bae_k8' / 'binaryae.th'), resolution=64)
    model = BinaryAutoEncoder(cfg)
    _CACHE['bae'] = jax.jit(lambda bits: model.apply(variables, bits, method=BinaryAutoEncoder.decode))
  return _CACHE['bae']


def _image(bae, tokens, code_dim):
  bits = E.tokens_to_bits(tokens, code_dim)
  return bits, np.asarray(bae(bits))


def _maxdiff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def _ar_settings(cj, greedy=False):
  s = dict(cfg_scale=cj['cfg_scale'], cfg_schedule=cj['cfg_schedule'])
  if greedy:
    return dict(s, top_k=1)
  return dict(s, top_k=cj['sample_top_k'], temperature=cj['sample_temperature'])


# ----------------------------------------------------------------------------- AR
@pytest.mark.parametrize('name', AR)
def test_ar_greedy_matches_reference(name, bae):
  model, v, io, cj = _fixture(name)
  fn = es.make_ar_sampler(model, injected=True, return_logits=True, **_ar_settings(cj, greedy=True))
  # greedy: any uniforms in [0, 1) give the argmax
  u = np.random.default_rng(0).uniform(size=io['topk_uniforms'].shape).astype(np.float32)
  out = jax.tree.map(np.asarray, fn(v, io['labels'], u))
  np.testing.assert_array_equal(out['tokens'], io['greedy_tokens'])
  assert _maxdiff(out['step_logits'], io['greedy_step_logits']) < 1e-4
  bits, image = _image(bae, out['tokens'], model.config.code_dim)
  np.testing.assert_array_equal(np.asarray(bits), nchw_to_nhwc(io['greedy_bits']))
  assert _maxdiff(image, nchw_to_nhwc(io['greedy_image'])) < IMAGE_TOL
  # the keyed path with top_k = 1 is greedy as well
  keyed = es.make_ar_sampler(model, **_ar_settings(cj, greedy=True))(v, io['labels'],
                                                                     per_sample_keys(7, 2))
  np.testing.assert_array_equal(np.asarray(keyed['tokens']), io['greedy_tokens'])


@pytest.mark.parametrize('name', AR)
def test_ar_topk_matches_reference(name, bae):
  model, v, io, cj = _fixture(name)
  out = es.generate(model, v, io['labels'], uniforms=io['topk_uniforms'], **_ar_settings(cj))
  np.testing.assert_array_equal(np.asarray(out['tokens']), io['topk_tokens'])
  _, image = _image(bae, out['tokens'], model.config.code_dim)
  assert _maxdiff(image, nchw_to_nhwc(io['topk_image'])) < IMAGE_TOL


def _prefix_recompute_sample(model, v, labels, uniforms, cfg_scale, cfg_schedule, temperature, top_k):
  """The reference's loop without a cache: every step runs the whole prefix [class, tokens 0..s-1] through the
  model (batch [cond; null]; the prefix is padded to N so that one compiled forward serves every step, and the
  causal mask hides the padding) and samples the T sub-tokens of position s, in float64 numpy."""
  cfg = model.config
  n, t = cfg.seq_len, cfg.token_each
  b = labels.shape[0]
  labels2 = np.concatenate([labels, np.full_like(labels, cfg.num_classes)])
  scales = es.cfg_scales(cfg_scale, cfg_schedule, n)
  forward = jax.jit(lambda x: model.apply(v, x, labels2))        # (2B, N, T) -> (2B, N*T, V)
  idx = np.zeros((b, n, t), np.int32)
  for s in range(n):
    logits = np.asarray(forward(np.concatenate([idx, idx])), np.float64)[:, s * t:(s + 1) * t]
    guided = logits[b:] + (logits[:b] - logits[b:]) * scales[s]
    guided = guided / temperature
    kth = np.sort(guided, axis=-1)[..., -top_k][..., None]
    guided = np.where(guided < kth, -np.inf, guided)
    p = np.exp(guided - guided.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx[:, s] = np.minimum((np.cumsum(p, -1) <= uniforms[s][..., None]).sum(-1), p.shape[-1] - 1)
  return idx


@pytest.mark.parametrize('name, schedule', [('elm_ar_2x4', 'cos'), ('elm_ar_1x8', 'square_root')])
def test_kv_cache_sampling_equals_prefix_recompute(name, schedule):
  model, v, io, cj = _fixture(name)
  cfg = model.config
  b = 3
  labels = np.array([1, 5, cfg.num_classes], np.int32)
  u = np.random.default_rng(1).uniform(size=(cfg.seq_len, b, cfg.token_each)).astype(np.float32)
  settings = dict(cfg_scale=3.0, cfg_schedule=schedule, temperature=0.7, top_k=min(50, cfg.codebook_size - 3))
  want = _prefix_recompute_sample(model, v, labels, u, **settings)
  got = np.asarray(es.generate(model, v, labels, uniforms=u, **settings)['tokens'])
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got)) > 3     # really sampled, not collapsed


def test_ar_keys_are_per_sample():
  model, v, io, cj = _fixture('elm_ar_2x4')
  settings = dict(cfg_scale=2.0, cfg_schedule='linear', temperature=1.0, top_k=None)
  fn = es.make_ar_sampler(model, **settings)
  root = jax.random.key(3)
  keys = per_sample_keys(root, 4)
  full = np.asarray(fn(v, np.array([0, 1, 2, 3], np.int32), keys)['tokens'])
  again = np.asarray(fn(v, np.array([0, 1, 2, 3], np.int32), keys)['tokens'])
  np.testing.assert_array_equal(full, again)
  # sample 2 alone (same key, same label) = row 2 of the batch
  alone = np.asarray(fn(v, np.array([2], np.int32), keys[2:3])['tokens'])
  np.testing.assert_array_equal(alone[0], full[2])
  assert not np.array_equal(full[0], full[1])
  other = np.asarray(fn(v, np.array([0, 1, 2, 3], np.int32), per_sample_keys(4, 4))['tokens'])
  assert not np.array_equal(full, other)
  assert full.min() >= 0 and full.max() < model.config.codebook_size


# ----------------------------------------------------------------------------- MLM
@pytest.mark.parametrize('name', MLM)
def test_mlm_matches_reference(name, bae):
  model, v, io, cj = _fixture(name)
  settings = dict(num_iter=cj['num_iter'], cfg_scale=cj['cfg_scale'], cfg_schedule=cj['cfg_schedule'],
                  temperature=cj['sample_temperature'])
  out = jax.tree.map(np.asarray, es.generate(model, v, io['labels'], uniforms=io['sample_uniforms'],
                                             gumbel=io['sample_gumbel'], **settings))
  np.testing.assert_array_equal(out['tokens'], io['sample_tokens'])
  counts = es.mlm_masked_counts(model.config.seq_len, cj['num_iter'])
  np.testing.assert_array_equal(out['masked_after_step'], np.broadcast_to(counts[:, None], (cj['num_iter'], 2)))
  mask_id = model.config.mask_token_id
  assert ((out['final_input'] == mask_id).all(-1).sum(-1) == counts[-1]).all()
  _, image = _image(bae, out['tokens'], model.config.code_dim)
  assert _maxdiff(image, nchw_to_nhwc(io['sample_image'])) < IMAGE_TOL


def test_mlm_keyed_sampling():
  model, v, io, cj = _fixture('elm_mlm_2x4')
  fn = es.make_mlm_sampler(model, num_iter=4, cfg_scale=2.5, cfg_schedule='powercos', temperature=2.0,
                           scale_pow=2.0)
  keys = per_sample_keys(11, 3)
  labels = np.array([3, 3, 10], np.int32)
  out = jax.tree.map(np.asarray, fn(v, labels, keys))
  assert out['tokens'].min() >= 0 and out['tokens'].max() < model.config.codebook_size
  np.testing.assert_array_equal(out['masked_after_step'].T, [[14, 11, 6, 1]] * 3)
  assert not np.array_equal(out['tokens'][0], out['tokens'][1])      # same label, different keys
  alone = np.asarray(fn(v, labels[1:2], keys[1:2])['tokens'])
  np.testing.assert_array_equal(alone[0], out['tokens'][1])


def test_schedules_json():
  table = json.loads((REF / 'schedules.json').read_text())
  checked = 0
  for key, want in table.items():
    m = re.fullmatch(r'elm_mlm_masked_after_step_N(\d+)_iter(\d+)', key)
    if m:
      np.testing.assert_array_equal(es.mlm_masked_counts(int(m.group(1)), int(m.group(2))), want, err_msg=key)
      checked += 1
  assert checked == 15
  n, i = 256, 10
  np.testing.assert_array_equal(es.mlm_mask_lengths(n, i), [math.floor(n * math.cos(math.pi / 2 * (s + 1) / i))
                                                            for s in range(i)])
  np.testing.assert_array_equal(es.mlm_mask_lengths(16, 4, 'linear'), [12, 8, 4, 0])
  np.testing.assert_array_equal(es.mlm_masked_counts(16, 4, 'linear'), [12, 8, 4, 1])
  with pytest.raises(ValueError, match='mask_schtype'):
    es.mlm_mask_lengths(16, 4, 'exp')


# ----------------------------------------------------------------------------- pieces
def test_cfg_schedules_closed_form():
  c = 4.0
  r = (np.arange(4) + 1) / 4
  np.testing.assert_allclose(es.cfg_scales(c, 'constant', 4), [4.0] * 4)
  np.testing.assert_allclose(es.cfg_scales(c, 'linear', 4), [1.75, 2.5, 3.25, 4.0])
  np.testing.assert_allclose(es.cfg_scales(c, 'cos', 4), 1 + 3 * np.sin(r * np.pi / 2))
  np.testing.assert_allclose(es.cfg_scales(c, 'log', 4), 1 + 3 * np.log(1 + r * (np.e - 1)))
  np.testing.assert_allclose(es.cfg_scales(c, 'square', 4), 1 + 3 * r ** 2)
  np.testing.assert_allclose(es.cfg_scales(c, 'square_root', 4), 1 + 3 * np.sqrt(np.arange(4) / 4))
  np.testing.assert_allclose(es.cfg_scales(c, 'powercos', 4, 'mlm', 1.0), 1 + 3 * (1 - np.cos(np.pi * r)) / 2)
  np.testing.assert_allclose(es.cfg_scales(c, 'powercos', 2, 'mlm', 2.0), [1 + 3 * (1 - np.cos(np.pi / 4)) / 2, 4])
  for sched, modeling in (('powercos', 'ar'), ('cos', 'mlm'), ('warm', 'ar')):
    with pytest.raises(ValueError, match='cfg_schedule'):
      es.cfg_scales(c, sched, 4, modeling)


def test_inverse_cdf_and_top_k():
  probs = jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 5)
  u = jnp.asarray([0.0, 0.0999, 0.1, 0.65, 0.99999])
  np.testing.assert_array_equal(es.inverse_cdf(probs, u), [0, 0, 1, 3, 3])
  # cumsum <= u everywhere (rounding) -> clipped to V - 1
  np.testing.assert_array_equal(es.inverse_cdf(jnp.asarray([[0.5, 0.49]]), jnp.asarray([0.995])), [1])
  logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.5]])
  np.testing.assert_array_equal(np.isfinite(filter_top_k_top_p(logits, 2)), [[False, True, False, True, False]])
  np.testing.assert_array_equal(np.isfinite(filter_top_k_top_p(logits, 3)), [[False, True, True, True, False]])
  np.testing.assert_array_equal(filter_top_k_top_p(logits, 0), logits)
  np.testing.assert_array_equal(filter_top_k_top_p(logits, 100), logits)


def test_bad_arguments():
  model, v, io, cj = _fixture('elm_ar_2x4')
  with pytest.raises(ValueError, match='uniforms'):
    es.generate(model, v, io['labels'], uniforms=io['topk_uniforms'][:3], **_ar_settings(cj))
  with pytest.raises(ValueError, match='temperature'):
    es.generate(model, v, io['labels'], rng=0, temperature=0.0)
  with pytest.raises(TypeError, match='PRNG'):
    es.make_ar_sampler(model)(v, io['labels'], np.zeros((2,), np.uint32))
  mlm, vm, iom, cjm = _fixture('elm_mlm_1x8')
  with pytest.raises(ValueError, match='gumbel'):
    es.generate(mlm, vm, iom['labels'], uniforms=iom['sample_uniforms'], gumbel=iom['sample_gumbel'][:2],
                num_iter=cjm['num_iter'])
