"""Sampler: greedy CFG decoding equals the reference's KV-cache sampler; filtering semantics; editing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw_to_nhwc
from var_jax.sampling import var as sampling
from var_jax.sampling.common import filter_top_k_top_p


def test_greedy_cfg_sampling_matches_reference(reference_model):
  _, pipe, io, cfg = reference_model
  images, tokens = pipe.sample(io['labels'], jax.random.key(0), cfg=cfg['sample_cfg'], top_k=1)
  np.testing.assert_array_equal(tokens, io['sample_tokens'])
  assert images.dtype == np.float32 and images.shape == nchw_to_nhwc(io['sample_image']).shape
  np.testing.assert_allclose(images, nchw_to_nhwc(io['sample_image']), atol=1e-4)
  # the 8 fake devices shard the batch; one device gives the same result
  _, tokens1 = pipe.sample(io['labels'], 0, cfg=cfg['sample_cfg'], top_k=1, shard=False)
  np.testing.assert_array_equal(tokens1, io['sample_tokens'])


def test_same_seed_same_images_any_batching(reference_model):
  _, pipe, _, _ = reference_model
  labels = [0, 3, 5, 9, 10]
  a_img, a_tok = pipe.sample(labels, 7, top_k=20, top_p=0.9)
  b_img, b_tok = pipe.sample(labels, 7, top_k=20, top_p=0.9, batch_size=2, shard=False)
  np.testing.assert_array_equal(a_tok, b_tok)
  np.testing.assert_allclose(a_img, b_img, atol=1e-5)
  _, c_tok = pipe.sample(labels, 8, top_k=20, top_p=0.9)
  assert not np.array_equal(a_tok, c_tok)
  assert a_img.min() >= 0 and a_img.max() <= 1 and a_tok.dtype == np.int32


def test_compiled_once_per_configuration(reference_model):
  _, pipe, io, _ = reference_model
  pipe.sample(io['labels'], 0, top_k=1)
  n = len(pipe._jit_cache)
  pipe.sample(io['labels'], 1, top_k=1)
  assert len(pipe._jit_cache) == n


def test_random_labels_and_more_smooth(reference_model):
  _, pipe, _, cfg = reference_model
  img, tok = pipe.sample(None, 3, num_samples=3, more_smooth=True, top_k=5)
  assert img.shape[0] == tok.shape[0] == 3 and np.isfinite(img).all()


def test_bad_labels(reference_model):
  _, pipe, _, cfg = reference_model
  with pytest.raises(ValueError, match=r'class label out of range.*\[0, 10\]'):
    pipe.sample([3, 11], 0)
  with pytest.raises(ValueError, match='num_samples'):
    pipe.sample(None, 0)
  with pytest.raises(ValueError, match='top_p'):
    pipe.sample([1], 0, top_p=1.5)


def test_top_k_top_p_semantics():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  k2 = filter_top_k_top_p(logits, top_k=2)
  np.testing.assert_array_equal(np.isfinite(k2[0]), [False, True, False, True, False])
  # top-p 0.7: sorted ascending probs .05 .1 .15 .3 .4, cumsum .05 .15 .3 .6 1.0; remove cumsum <= 0.3
  p = filter_top_k_top_p(logits, top_p=0.7)
  np.testing.assert_array_equal(np.isfinite(p[0]), [False, True, False, True, False])
  # the largest is always kept
  p = filter_top_k_top_p(logits, top_p=1e-6)
  np.testing.assert_array_equal(np.isfinite(p[0]), [False, True, False, False, False])
  # top-k keeps ties at the k-th value
  t = filter_top_k_top_p(jnp.array([[1., 2., 2., 0.]]), top_k=2)
  np.testing.assert_array_equal(np.isfinite(t[0]), [False, True, True, False])
  # sampling from a top-k=1 filtered distribution is the argmax
  keys = jax.random.split(jax.random.key(0), 64)
  lg = jax.random.normal(jax.random.key(1), (64, 100))
  draws = jax.vmap(jax.random.categorical)(keys, filter_top_k_top_p(lg, top_k=1))
  np.testing.assert_array_equal(draws, jnp.argmax(lg, -1))


def test_cfg_zero_is_conditional_only(reference_model):
  """With cfg=0 the null-class half must not matter: greedy tokens equal the teacher-forced argmax chain."""
  _, pipe, io, _ = reference_model
  _, tok = pipe.sample(io['labels'], 0, cfg=0.0, top_k=1)
  lg = pipe.logits(io['labels'], tok)
  np.testing.assert_array_equal(np.argmax(lg, -1), tok)


def test_edit_keeps_region_and_full_mask_reconstructs(reference_model):
  _, pipe, io, cfg = reference_model
  img = nchw_to_nhwc(io['image'])
  toks_in = [np.asarray(t) for t in pipe.encode(img)]
  pns = cfg['patch_nums']
  # keep the left half (out-painting the right half), at image resolution
  s = img.shape[1]
  keep = np.zeros((s, s), np.float32)
  keep[:, : s // 2] = 1
  masks = [np.asarray(m) for m in sampling.edit_force_masks(np.broadcast_to(keep, (2, s, s)), pns)]
  _, tok = pipe.edit(img, keep, io['labels'], 0, top_k=10)
  off = 0
  for k, p in enumerate(pns):
    part = tok[:, off:off + p * p]
    np.testing.assert_array_equal(part[masks[k]], toks_in[k][masks[k]], err_msg=f'scale {k}')
    off += p * p
  assert masks[-1].sum() == 2 * pns[-1] * pns[-1] // 2          # half the finest map is kept
  # a full keep-mask reproduces the input's tokens and reconstruction
  full_img, full_tok = pipe.edit(img, np.ones((s, s)), io['labels'], 1, top_k=10)
  np.testing.assert_array_equal(full_tok, io['tokens'])
  np.testing.assert_allclose(full_img, (nchw_to_nhwc(io['recon']) + 1) / 2, atol=1e-4)


def test_edit_mask_rules():
  pns = (1, 2, 3, 4)
  m = np.zeros((1, 4, 4), np.float32)
  out = sampling.edit_force_masks(m, pns)
  assert bool(out[0].all()) and not bool(out[1].any())    # <= 3 tokens: always the input's (the reference rule)
  m[:, :2, :2] = 1
  out = sampling.edit_force_masks(m, pns)
  np.testing.assert_array_equal(np.asarray(out[-1]).reshape(4, 4), m[0] > 0.5)
  with pytest.raises(ValueError, match='keep_mask'):
    sampling.edit_force_masks(np.zeros((4,)), pns)
