"""The evaluation protocol's pieces that need no Inception network: image sets, reference batches, test loss,
reconstructions, sharded sample generation."""
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from tests_helpers import quickstart_config
from var_jax import VARPipeline
from var_jax.data import pipeline as data_lib
from var_jax.eval import evaluator, metrics, protocol
from var_jax.train.tasks import var as var_task


@pytest.fixture(scope='module')
def quick_pipe():
  config = quickstart_config()
  vae_cfg, var_cfg = var_task.model_configs(config)
  return config, VARPipeline.init_random(vae_cfg, var_cfg, jax.random.key(0))


def test_test_loss_matches_teacher_forced_logits(quick_pipe):
  config, pipe = quick_pipe
  res = evaluator.test_loss(pipe, config.data, 'val', batch_size=8, max_batches=2)
  # the same 16 images by hand: tokens -> logits -> cross-entropy / argmax accuracy
  batches = list(data_lib.make_eval_dataset(config.data, 8, source=data_lib.make_source(config.data, 'val')))[:2]
  ce, acc, ce_scales = [], [], []
  for b in batches:
    m = np.asarray(b['mask']).astype(bool)
    toks = pipe.encode(np.asarray(b['image'])[m])
    gt = np.concatenate([np.asarray(t) for t in toks], axis=1)
    lg = np.asarray(pipe.logits(np.asarray(b['label'])[m], toks))
    per = np.asarray(optax.softmax_cross_entropy_with_integer_labels(lg, gt))
    ce.append(per.mean(1))
    acc.append((lg.argmax(-1) == gt).mean(1))
    ce_scales.append(np.stack([per[:, s:e].mean(1) for s, e in pipe.var_config.begin_ends], 1))
  ce, acc, ce_scales = np.concatenate(ce), np.concatenate(acc), np.concatenate(ce_scales)
  assert res['examples'] == len(ce) == 16
  np.testing.assert_allclose(res['test_loss'], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(res['test_acc'], 100 * acc.mean(), rtol=1e-5)
  np.testing.assert_allclose(res['test_error'], 1 - acc.mean(), rtol=1e-5)
  for s in range(len(pipe.var_config.patch_nums)):
    np.testing.assert_allclose(res[f'test_loss_scale{s}'], ce_scales[:, s].mean(), rtol=1e-5)
  assert res['test_loss_last'] == res[f'test_loss_scale{len(pipe.var_config.patch_nums) - 1}']
  # an untrained model is near chance: log(V)
  assert abs(res['test_loss'] - np.log(pipe.var_config.vocab_size)) < 1.0
  with pytest.raises(ValueError, match='multiple of the 8 local devices'):
    evaluator.test_loss(pipe, config.data, 'val', batch_size=6)


def test_reconstruction_sets(quick_pipe):
  config, pipe = quick_pipe
  orig, rec, pix = evaluator.reconstruction_sets(pipe, config.data, 'val', batch_size=8, max_images=11)
  assert orig.shape == rec.shape == (11, 32, 32, 3) and orig.dtype == rec.dtype == np.uint8
  b = next(iter(data_lib.make_eval_dataset(config.data, 8, source=data_lib.make_source(config.data, 'val'))))
  img = np.asarray(b['image'])
  np.testing.assert_array_equal(orig[:8], evaluator.to_uint8((img + 1) / 2))
  np.testing.assert_array_equal(rec[:8], evaluator.to_uint8((np.asarray(pipe.reconstruct(img)) + 1) / 2))
  mse = ((orig.astype(np.float64) - rec) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(pix['psnr'], np.mean(10 * np.log10(255 ** 2 / mse)), rtol=1e-9)
  assert pix['num_images'] == 11


def _write_pngs(folder, images):
  os.makedirs(folder, exist_ok=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(folder, f'{i:03d}.png'))


def test_image_sets(tmp_path):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
  _write_pngs(tmp_path / 'f', imgs)
  np.savez(tmp_path / 's.npz', arr_0=imgs)
  for s in (evaluator.ImageSet.open(str(tmp_path / 'f')), evaluator.ImageSet.open(str(tmp_path / 's.npz')),
            evaluator.ImageSet.from_array(imgs)):
    assert len(s) == 7
    got = list(s.batches(3))
    assert [len(g) for g in got] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(got), imgs)
  Image.fromarray(imgs[0, :5]).save(tmp_path / 'f' / '999.png')
  with pytest.raises(ValueError, match=r'999.png: image size \(5, 11\) differs'):
    list(evaluator.ImageSet.open(str(tmp_path / 'f')).batches(4))
  with pytest.raises(ValueError, match='uint8'):
    evaluator.ImageSet.from_array(imgs.astype(np.float32))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no image files'):
    evaluator.ImageSet.open(str(tmp_path / 'empty'))
  np.savez(tmp_path / 'bad.npz', images=imgs)
  with pytest.raises(KeyError, match=r"has no 'arr_0'.*images"):
    evaluator.ImageSet.open(str(tmp_path / 'bad.npz'))


def test_reference_statistics_and_metrics(tmp_path):
  rng = np.random.default_rng(1)
  real = rng.normal(size=(60, 8)).astype(np.float32)
  fake = (rng.normal(size=(50, 8)) * 1.3 + 0.2).astype(np.float32)
  mu, sigma = metrics.feature_statistics(real)
  metrics.save_statistics(tmp_path / 'stats.npz', mu, sigma)
  ref = evaluator.load_reference(str(tmp_path / 'stats.npz'))
  assert ref.pool3 is None
  logits = rng.normal(size=(50, 12))
  out = evaluator.sample_metrics({'pool3': fake, 'logits': logits}, ref, is_split='equal10')   # the 10-split rule
  assert 'precision' not in out    # statistics alone cannot give precision/recall
  np.testing.assert_allclose(out['fid'], metrics.frechet_distance(*metrics.feature_statistics(fake), mu, sigma))
  np.testing.assert_allclose(out['inception_score'], metrics.inception_score(logits, splits=10)[0])
  # with features: a cache round trip keeps them and precision/recall appear
  full = evaluator.Reference(mu, sigma, real, 'x')
  evaluator.save_reference(str(tmp_path / 'cache.npz'), full)
  back = evaluator.load_reference('unused-because-cached', cache=str(tmp_path / 'cache.npz'))
  np.testing.assert_array_equal(back.pool3, real)
  out = evaluator.sample_metrics({'pool3': fake, 'logits': logits}, back, k=3, pr_distance_dtype='float32')
  p, r = metrics.precision_recall(real, fake, k=3)
  assert (out['precision'], out['recall']) == (p, r)
  assert evaluator.sample_metrics({'pool3': real, 'logits': logits[:50]}, back)['fid'] == pytest.approx(0, abs=1e-6)
  np.savez(tmp_path / 'nothing.npz', foo=np.zeros(3))
  with pytest.raises(KeyError, match=r"expected 'arr_0' images .* or 'mu'/'sigma'"):
    evaluator.load_reference(str(tmp_path / 'nothing.npz'))
  with pytest.raises(FileNotFoundError, match='no such file'):
    evaluator.load_reference(str(tmp_path / 'missing.npz'))
  with pytest.raises(ValueError, match='needs the Inception weights'):
    _write_pngs(tmp_path / 'imgs', rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    evaluator.load_reference(str(tmp_path / 'imgs'))


def test_sharded_generation_partitions_ids(tmp_path):
  from conftest import fixture_dir
  d = fixture_dir('tiny')
  pipe = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  labels = protocol.sample_plan(10, ['2', '5'], 3)
  out = str(tmp_path / 's')
  n = protocol.write_samples(pipe, labels, 0, 1.5, 10, 0.9, False, 4, 'float32', out_dir=out, shard_index=1,
                             shard_count=2, write_outputs=False)
  assert n == 3 and sorted(os.listdir(out)) == [protocol.image_name(i, labels[i]) for i in (1, 3, 5)] + [
      protocol.PLAN_FILE]
  with pytest.raises(FileNotFoundError, match=r'3 of 6 samples are missing'):
    protocol.write_npz(out, labels)
  assert protocol.write_samples(pipe, labels, 0, 1.5, 10, 0.9, False, 4, 'float32', out_dir=out,
                                 shard_index=0, shard_count=2, write_outputs=False) == 3
  arr = np.load(protocol.write_npz(out, labels))['arr_0']
  # the same images as one unsharded process draws (keys are per global image id)
  ref, _ = pipe.sample(labels, 0, cfg=1.5, top_k=10, top_p=0.9, sample_ids=list(range(6)))
  np.testing.assert_array_equal(arr, evaluator.to_uint8(ref))
