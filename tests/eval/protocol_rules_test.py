"""The evaluation-protocol rules that separate OpenAI's guided-diffusion evaluator from pytorch-fid / improved-GAN:
the Inception Score split rule, the float16 precision/recall distances, the TF1-legacy Inception input resize, and
torch's float32 bilinear rounding. Each rule is checked against a direct re-implementation of the reference code
(numpy, or torch itself), with exact equality where the arithmetic allows, and shown to differ from the other rule.
"""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from var_jax.eval import inception, metrics
from var_jax.ops import resize

F16, F32 = np.float16, np.float32


# ----------------------------------------------------------------------------- Inception Score split rule
def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _evaluator_inception_score(preds, split_size=5000):
  """guided-diffusion ``Evaluator.compute_inception_score`` after its softmax, verbatim."""
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    kl = np.mean(np.sum(kl, 1))
    scores.append(np.exp(kl))
  return float(np.mean(scores))


def _equal_splits_inception_score(preds, splits):
  scores = []
  n = len(preds)
  for i in range(splits):
    part = preds[i * n // splits:(i + 1) * n // splits]
    kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))


@pytest.fixture(scope='module')
def logits_12000():
  # Class structure that varies along the set, so that different chunkings give visibly different scores.
  rng = np.random.default_rng(0)
  n, c = 12000, 20
  centers = rng.normal(0, 3, (c, c))
  labels = (np.arange(n) * c // n + rng.integers(0, 3, n)) % c
  return centers[labels] + rng.normal(0, 1.5, (n, c))


def test_inception_score_default_is_the_evaluators_5000_chunks(logits_12000):
  preds = _softmax(logits_12000)
  want = _evaluator_inception_score(preds)                           # chunks of 5000, 5000, 2000
  by_hand = np.mean([_equal_splits_inception_score(preds[s:e], 1) for s, e in ((0, 5000), (5000, 10000),
                                                                                (10000, 12000))])
  assert want == pytest.approx(by_hand, rel=1e-12)
  mean, std = metrics.inception_score(logits_12000)
  assert mean == pytest.approx(want, rel=1e-9)
  assert metrics.inception_score(logits_12000, split_size=5000) == (mean, std)
  assert metrics.inception_score(logits_12000, **metrics.is_split_kwargs('chunks5000')) == (mean, std)
  chunk_scores = [metrics.inception_score(logits_12000[s:e], splits=1)[0]
                  for s, e in ((0, 5000), (5000, 10000), (10000, 12000))]
  assert std == pytest.approx(np.std(chunk_scores), rel=1e-9)
  # The 10-equal-splits rule (1200 samples each) is a different number on the same predictions.
  equal10 = metrics.inception_score(logits_12000, splits=10)[0]
  assert equal10 == pytest.approx(_equal_splits_inception_score(preds, 10), rel=1e-9)
  assert metrics.inception_score(logits_12000, **metrics.is_split_kwargs('equal10'))[0] == equal10
  assert abs(equal10 - mean) > 1e-3 * mean
  # Both rules coincide when 5000 * splits = N.
  assert metrics.inception_score(logits_12000[:10000])[0] == pytest.approx(
      metrics.inception_score(logits_12000[:10000], splits=2)[0], rel=1e-12)


def test_inception_score_rule_arguments():
  x = np.zeros((30, 4))
  assert metrics.is_split_kwargs('chunks5000') == {'split_size': 5000}
  assert metrics.is_split_kwargs('equal10') == {'splits': 10}
  assert metrics.is_split_kwargs('equal10', num_samples=8) == {'splits': 8}
  assert metrics.inception_score(x, split_size=7) == pytest.approx((1.0, 0.0))   # 7, 7, 7, 7, 2
  for bad in ('chunks', 'equal0', '10', 'chunk5000', 5000):
    with pytest.raises(ValueError, match='split rule'):
      metrics.is_split_kwargs(bad)
  with pytest.raises(ValueError, match='not both'):
    metrics.inception_score(x, splits=3, split_size=10)
  with pytest.raises(ValueError, match='split_size must be positive'):
    metrics.inception_score(x, split_size=0)


# ----------------------------------------------------------------------------- precision / recall in float16
def _distance_block(u, v):
  """guided-diffusion ``DistanceBlock`` in numpy: float16 ``_batch_pairwise_distances`` (squares in float16, sums and
  matmul accumulated in float32, each result rounded to float16), the float32 formula if the block is not finite."""
  u16, v16 = u.astype(F16), v.astype(F16)
  with np.errstate(over='ignore', invalid='ignore'):
    nu = np.sum(np.square(u16), axis=1, dtype=F32).astype(F16).reshape(-1, 1)
    nv = np.sum(np.square(v16), axis=1, dtype=F32).astype(F16).reshape(1, -1)
    d = np.maximum(nu - F16(2) * (u16.astype(F32) @ v16.astype(F32).T).astype(F16) + nv, F16(0))
  if np.all(np.isfinite(d)):
    return d.astype(F32)
  u, v = u.astype(F32), v.astype(F32)
  return np.maximum(np.sum(u * u, 1)[:, None] - 2 * (u @ v.T) + np.sum(v * v, 1)[None, :], 0).astype(F32)


def _manifold_estimator_pr(ref, sample, k=3, block=10000):
  """guided-diffusion ``ManifoldEstimator.manifold_radii`` + ``evaluate_pr`` (row/col batches of ``block``)."""
  def radii(x):
    out = np.zeros(len(x), F32)
    for b1 in range(0, len(x), block):
      row = np.concatenate([_distance_block(x[b1:b1 + block], x[b2:b2 + block]) for b2 in range(0, len(x), block)],
                           axis=1)
      out[b1:b1 + block] = np.partition(row, np.arange(k + 1), axis=1)[:, k]
    return out
  r1, r2 = radii(ref), radii(sample)
  s1, s2 = np.zeros(len(ref), bool), np.zeros(len(sample), bool)
  for b1 in range(0, len(ref), block):
    for b2 in range(0, len(sample), block):
      d = _distance_block(ref[b1:b1 + block], sample[b2:b2 + block])
      s1[b1:b1 + block] |= np.any(d <= r2[None, b2:b2 + block], axis=1)
      s2[b2:b2 + block] |= np.any(d <= r1[b1:b1 + block, None], axis=0)
  return float(s2.mean()), float(s1.mean())


def _grid_features(seed, n_real=150, n_fake=140, dim=64):
  # Multiples of 1/16 below 4: every float32 sum and dot product is exact whatever the accumulation order, so the
  # float16 rounding of each distance is fully determined and the comparison can be exact.
  rng = np.random.default_rng(seed)
  real = (rng.integers(0, 64, (n_real, dim)) / 16).astype(F32)
  fake = (rng.integers(0, 60, (n_fake, dim)) / 16).astype(F32)
  return real, fake


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_float16_precision_recall_is_the_manifold_estimator(seed):
  real, fake = _grid_features(seed)
  want = _manifold_estimator_pr(real, fake)
  assert metrics.precision_recall(real, fake, k=3, batch_size=64, distance_dtype='float16') == want
  assert metrics.precision_recall(real, fake, k=3, batch_size=1000, distance_dtype='float16') == want
  # float16 distances are a different rule: on these seeds it moves precision or recall.
  assert metrics.precision_recall(real, fake, k=3, batch_size=64) != want


def test_float16_precision_recall_on_continuous_features():
  rng = np.random.default_rng(1)
  real = np.abs(rng.normal(0.4, 0.5, (500, 256))).astype(F32)
  fake = np.abs(rng.normal(0.42, 0.5, (480, 256))).astype(F32)
  p16 = metrics.precision_recall(real, fake, distance_dtype='float16')
  assert p16 == _manifold_estimator_pr(real, fake)
  assert p16 != metrics.precision_recall(real, fake)


def test_float16_precision_recall_falls_back_to_float32_per_block(monkeypatch):
  rng = np.random.default_rng(2)
  real = np.abs(rng.normal(0.4, 0.5, (300, 128))).astype(F32)
  fake = np.abs(rng.normal(0.42, 0.5, (280, 128))).astype(F32)
  real[5] *= 100          # |x|^2 ~ 1e5 overflows float16: that sample's blocks are evaluated in float32
  assert metrics.precision_recall(real, fake, distance_dtype='float16') == _manifold_estimator_pr(real, fake)
  monkeypatch.setattr(metrics, 'EVALUATOR_BLOCK', 128)   # several blocks, only those touching sample 5 fall back
  want = _manifold_estimator_pr(real, fake, block=128)
  assert metrics.precision_recall(real, fake, batch_size=100, distance_dtype='float16') == want
  assert metrics.precision_recall(real, fake, batch_size=50, distance_dtype='float16') == want
  with pytest.raises(ValueError, match='distance_dtype'):
    metrics.precision_recall(real, fake, distance_dtype='bfloat16')


# ----------------------------------------------------------------------------- TF1 legacy bilinear resize
def _fma(a, b, c):
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(F32)   # one rounding: a * b is exact in float64


def _tf1_resize_bilinear(x, out_h, out_w, fma=False):
  """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` by its formula, float32, NHWC:
  ``top = tl + (tr - tl) * x_lerp`` etc., rounded twice, or with ``fma``: as ``fma(tr - tl, x_lerp, tl)`` (what TF's
  GPU kernel compiles to, and XLA's CPU backend)."""
  def taps(n_in, n_out):
    scale = F32(n_in) / F32(n_out)
    src = np.arange(n_out, dtype=F32) * scale
    return np.floor(src).astype(int), np.minimum(np.ceil(src), n_in - 1).astype(int), (src - np.floor(src))
  lerp = (lambda a, b, t: _fma(b - a, t, a)) if fma else (lambda a, b, t: a + (b - a) * t)
  y0, y1, yl = taps(x.shape[1], out_h)
  x0, x1, xl = taps(x.shape[2], out_w)
  xl, yl = xl[None, None, :, None], yl[None, :, None, None]
  tl, tr = x[:, y0][:, :, x0], x[:, y0][:, :, x1]
  bl, br = x[:, y1][:, :, x0], x[:, y1][:, :, x1]
  top, bottom = lerp(tl, tr, xl), lerp(bl, br, xl)
  return lerp(top, bottom, yl)


def test_tf1_legacy_resize_2x3_to_4x5_by_hand():
  x = np.array([[0, 10, 40], [100, 50, 20]], F32)[None, :, :, None]
  got = np.asarray(resize.tf1_legacy_bilinear_resize(jnp.asarray(x), (4, 5)))[0, :, :, 0]
  # rows sample y = 0, 0.5, 1, 1.5 (clamped to row 1); columns x = 0, 0.6, 1.2, 1.8, 2.4 (clamped to column 2)
  row0 = [0, 6, 16, 34, 40]
  row1 = [100, 70, 44, 26, 20]
  want = np.array([row0, [(a + b) / 2 for a, b in zip(row0, row1)], row1, row1], np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(got, _tf1_resize_bilinear(x, 4, 5)[0, :, :, 0], rtol=0, atol=1e-5)
  # not the half-pixel (torch / pytorch-fid) resize
  assert np.abs(got - np.asarray(resize.bilinear_resize(jnp.asarray(x), (4, 5)))[0, :, :, 0]).max() > 1


@pytest.mark.parametrize('in_hw,out_hw', [((256, 256), (299, 299)), ((32, 48), (299, 299)), ((7, 5), (13, 11)),
                                          ((300, 320), (299, 299))])
def test_tf1_legacy_resize_matches_the_formula(in_hw, out_hw):
  x = np.random.default_rng(0).integers(0, 256, (2,) + in_hw + (3,)).astype(F32)
  got = np.asarray(resize.tf1_legacy_bilinear_resize(jnp.asarray(x), out_hw))
  plain, fused = _tf1_resize_bilinear(x, *out_hw), _tf1_resize_bilinear(x, *out_hw, fma=True)
  # Every output is the formula's float32 value, with or without FMA contraction (XLA's CPU backend contracts: all
  # of them equal ``fused`` there); the two differ by a few ulps of [0, 255].
  assert np.all((got == fused) | (got == plain))
  np.testing.assert_allclose(got, plain, rtol=0, atol=8 * np.spacing(F32(255)))


def test_tf1_legacy_preprocessing():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (2, 20, 30, 3)).astype(np.uint8)
  got = np.asarray(inception.preprocess(u8, preprocessing='tf1_legacy'))
  fused = _tf1_resize_bilinear(u8.astype(F32), 299, 299, fma=True)
  plain = _tf1_resize_bilinear(u8.astype(F32), 299, 299)
  assert np.all((got == (fused - 128) / 128) | (got == (plain - 128) / 128))
  np.testing.assert_allclose(got, (plain - 128) / 128, rtol=0, atol=8 * np.spacing(F32(2)))
  # float inputs are taken as [0, 1]
  np.testing.assert_allclose(np.asarray(inception.preprocess(u8.astype(F32) / 255, preprocessing='tf1_legacy')),
                             got, rtol=0, atol=1e-5)
  # without the resize: the graph's normalisation alone, (x - 128) / 128 (0 -> -1, 255 -> 0.9921875)
  big = rng.integers(0, 256, (1, 80, 80, 3)).astype(np.uint8)
  big[0, 0, 0] = (0, 255, 128)
  n = np.asarray(inception.preprocess(big, resize_input=False, preprocessing='tf1_legacy'))
  np.testing.assert_array_equal(n, (big.astype(F32) - 128) / 128)
  assert tuple(n[0, 0, 0]) == (-1.0, 0.9921875, 0.0)
  # pytorch-fid's path maps 255 to 1 and resizes with half-pixel centres: a different input
  p = np.asarray(inception.preprocess(big, resize_input=False))
  assert tuple(p[0, 0, 0]) == (-1.0, 1.0, pytest.approx(2 * 128 / 255 - 1, abs=1e-6))
  assert np.abs(np.asarray(inception.preprocess(u8)) - got).max() > 0.05
  with pytest.raises(ValueError, match='preprocessing'):
    inception.preprocess(u8, preprocessing='tf2')


@pytest.mark.slow    # compiles the Inception network on CPU (~1 min)
def test_tf1_legacy_preprocessing_through_the_network():
  params = inception.init_params(jax.random.key(0))
  u8 = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  p_tf, l_tf = inception.extract_features(params, u8, batch_size=2, preprocessing='tf1_legacy')
  direct = inception._network(jax.tree.map(jnp.asarray, params), inception.preprocess(u8, preprocessing='tf1_legacy'))
  np.testing.assert_allclose(p_tf, np.asarray(direct['pool3']), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l_tf, np.asarray(direct['logits_unbiased']), rtol=1e-5, atol=1e-5)
  p_pt, _ = inception.extract_features(params, u8, batch_size=2)
  assert np.abs(p_pt - p_tf).max() > 1e-3 * np.abs(p_tf).max()


# ----------------------------------------------------------------------------- torch's float32 bilinear rounding
@pytest.fixture
def torch_generic_bilinear():
  """torch runs its generic bilinear kernel (the one matched bit for bit) for C = 3 only with more than one thread
  (single-threaded C = 3 images take a separable kernel that rounds differently)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(max(2, threads))
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize('in_hw,out_hw', [((256, 256), (299, 299)), ((64, 64), (299, 299)), ((32, 48), (299, 299)),
                                          ((512, 512), (299, 299)), ((300, 300), (299, 299)),
                                          ((100, 80), (150, 120)), ((512, 400), (200, 160))])
def test_bilinear_is_torch_to_the_last_ulp(in_hw, out_hw, torch_generic_bilinear):
  x = np.random.default_rng(0).standard_normal((2, 3) + in_hw).astype(F32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode='bilinear', align_corners=False,
                                         antialias=False).numpy()
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  got = np.asarray(resize.bilinear_resize(nhwc, out_hw)).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(got, want)
  jitted = jax.jit(resize.bilinear_resize, static_argnums=1)
  np.testing.assert_array_equal(np.asarray(jitted(nhwc, out_hw)).transpose(0, 3, 1, 2), want)
  # the exact-float64-weights resize (the previous implementation) is measurably off
  old = np.einsum('oh,bchw->bcow', resize._bilinear_matrix(in_hw[0], out_hw[0]),
                  np.einsum('pw,bchw->bchp', resize._bilinear_matrix(in_hw[1], out_hw[1]), x.astype(np.float64)))
  assert np.abs(old - want).max() > 1e-6


def test_bilinear_weights_are_torchs_float32_weights():
  for n_in in (1, 2, 3, 5, 13, 16, 31, 32, 48, 64, 256):
    for n_out in (1, 2, 3, 7, 13, 16, 33, 64, 299):
      one_hot = torch.zeros(1, n_in, 1, n_in)     # channel c = unit impulse at w = c: the output is the weights
      one_hot[0, range(n_in), 0, range(n_in)] = 1
      w = torch.nn.functional.interpolate(one_hot, size=(1, n_out), mode='bilinear', align_corners=False)
      np.testing.assert_array_equal(resize._bilinear_matrix_f32(n_in, n_out), w[0, :, 0, :].numpy().T,
                                    err_msg=f'{n_in} -> {n_out}')


def test_pytorch_fid_preprocessing_is_torch_exact(torch_generic_bilinear):
  u8 = np.random.default_rng(3).integers(0, 256, (2, 256, 256, 3)).astype(np.uint8)
  x = torch.from_numpy(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))).float() / 255
  want = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
  got = np.asarray(jax.jit(inception.preprocess)(u8)).transpose(0, 3, 1, 2)
  np.testing.assert_array_equal(got, want.numpy())


# ----------------------------------------------------------------------------- the rules in the protocol's metrics
def test_sample_metrics_default_to_the_evaluators_rules_and_record_them():
  from var_jax.eval import evaluator
  rng = np.random.default_rng(4)
  real = np.abs(rng.normal(0.4, 0.5, (400, 64))).astype(F32)
  fake = np.abs(rng.normal(0.45, 0.5, (6000, 64))).astype(F32)
  logits = rng.normal(0, 2, (6000, 30))
  ref = evaluator.Reference(*metrics.feature_statistics(real), real, 'ref')
  out = evaluator.sample_metrics({'pool3': fake, 'logits': logits}, ref)
  assert out['is_split'] == 'chunks5000' and out['pr_distance_dtype'] == 'float16'
  assert out['inception_score'] == metrics.inception_score(logits, split_size=5000)[0]        # chunks 5000 + 1000
  assert (out['precision'], out['recall']) == metrics.precision_recall(real, fake, distance_dtype='float16')
  old = evaluator.sample_metrics({'pool3': fake, 'logits': logits}, ref, is_split='equal10',
                                 pr_distance_dtype='float32')
  assert old['is_split'] == 'equal10' and old['pr_distance_dtype'] == 'float32'
  assert old['inception_score'] == metrics.inception_score(logits, splits=10)[0] != out['inception_score']
  assert (old['precision'], old['recall']) == metrics.precision_recall(real, fake)
