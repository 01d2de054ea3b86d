r"""Evaluate VAR models and tokenizers: ``python -m var_jax.evaluate``.

Sample-quality metrics (FID, Inception Score, precision/recall k=3) of a class-conditional model, with the paper's
protocol fixed in code: 50 images per class, cfg 1.5, top-k 900, top-p 0.96, no smoothing, every image written as
PNG and read back (uint8 round trip), the FID Inception-v3. See ``var_jax/eval/evaluator.py`` for the details and
for how the numbers relate to OpenAI's evaluator (whose input, ``samples.npz``, is written too).

  # 50k samples from released weights, sharded over all devices, then FID/IS/P/R vs OpenAI's reference batch
  python -m var_jax.evaluate --vae_ckpt=vae_ch160v4096z32.pth --var_ckpt=var_d16.pth \
      --out_dir=eval_d16 --ref=VIRTUAL_imagenet256_labeled.npz --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_cache=imagenet256_ref_stats.npz
  # an existing folder or .npz of samples
  python -m var_jax.evaluate --samples=eval_d16/samples.npz --ref=... --inception=...
  # tokenizer rFID (+ PSNR) on a data split, and VAR's test loss / token accuracy (scaling-law quantities)
  python -m var_jax.evaluate --config=configs/quickstart.py --checkpoint=workdir/model --rfid --test_loss \
      --inception=... --out_dir=eval_q

The Inception weights are never downloaded: pass pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the
``.safetensors`` that ``python -m var_jax.eval.inception`` converts it to). Results go to ``<out_dir>/metrics.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
# what to evaluate
flags.DEFINE_string('checkpoint', None, 'a var_jax model directory (workdir/model)')
flags.DEFINE_string('vae_ckpt', None, 'reference-layout VQVAE weights (.pth or .safetensors)')
flags.DEFINE_string('var_ckpt', None, 'reference-layout VAR weights (.pth or .safetensors)')
flags.DEFINE_list('patch_nums', None, 'override the inferred patch_nums (comma list)')
flags.DEFINE_enum('model', 'auto', ['auto', 'var', 'elm', 'bigr'], 'model family (auto: from the checkpoint flags)')
flags.DEFINE_string('bae_ckpt', None, 'ELM/BiGR: reference binary autoencoder weights')
flags.DEFINE_string('model_ckpt', None, 'ELM/BiGR: reference generator weights')
flags.DEFINE_list('model_args', [], 'ELM/BiGR: reference ModelArgs fields as key=value (JSON values)')
flags.DEFINE_string('samples', None, 'evaluate these samples (folder of images or .npz with arr_0) instead of '
                    'generating')
# generation protocol (defaults: the paper's FID setting)
flags.DEFINE_integer('num_per_class', 50, 'images per class (the paper: 50 x 1000 classes)')
flags.DEFINE_list('classes', None, 'restrict to these classes (default: all)')
flags.DEFINE_float('cfg', None, 'classifier-free guidance (default: the family\'s paper setting, VAR 1.5)')
flags.DEFINE_integer('top_k', None, 'top-k filtering (0: off; default VAR 900, ELM 1000)')
flags.DEFINE_float('top_p', None, 'VAR top-p filtering (0: off; default 0.96)')
flags.DEFINE_integer('seed', 0, 'PRNG seed (image i uses fold_in(seed, i))')
flags.DEFINE_integer('batch_size', 64, 'images per compiled sampling call (split over local devices)')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'sampling compute dtype')
# metrics
flags.DEFINE_string('ref', None, 'reference batch: OpenAI .npz (arr_0 images and/or mu/sigma), a statistics .npz or '
                    'a folder of images')
flags.DEFINE_string('ref_cache', None, 'store/reuse the reference statistics + features here (.npz)')
flags.DEFINE_string('inception', None, 'FID Inception-v3 weights: pytorch-fid .pth or its converted .safetensors')
flags.DEFINE_integer('inception_batch', 200, 'images per Inception call (split over local devices)')
flags.DEFINE_integer('pr_k', 3, 'k of the k-NN manifolds of precision/recall')
flags.DEFINE_bool('rfid', False, 'tokenizer rFID + PSNR: reconstructions vs originals of --split (needs --config)')
flags.DEFINE_bool('test_loss', False, 'VAR teacher-forced loss / token accuracy over --split (needs --config)')
flags.DEFINE_string('split', None, 'data split for --rfid/--test_loss (default: config.data.eval_split)')
flags.DEFINE_integer('max_images', -1, '--rfid: at most this many images (-1: the whole split)')
flags.DEFINE_integer('max_batches', -1, '--test_loss: at most this many batches (-1: the whole split)')
flags.DEFINE_string('out_dir', None, 'samples (PNGs + samples.npz) and metrics.json go here')
config_flags.DEFINE_config_file('config', None, 'training config (its data section) for --rfid / --test_loss',
                                lock_config=False)


def _print(msg: str):
  print(msg, flush=True)


def _features(path: Optional[str], batch: int):
  from var_jax.eval import evaluator, inception
  if not path:
    raise ValueError('--inception is required for FID/IS/precision/recall: pass pytorch-fid\'s '
                     'pt_inception-2015-12-05-6726825d.pth (or its converted .safetensors); it is never downloaded')
  return evaluator.InceptionFeatures(inception.load_inception_params(path), batch_size=batch)


def generate(pipe, out_dir: str) -> str:
  """The protocol's samples, sharded over processes (image i on process i % count) and local devices; resumable.
  Returns the path of ``samples.npz``."""
  import jax
  from var_jax import sample as sample_lib
  labels = sample_lib.sample_plan(sample_lib.num_classes(pipe), FLAGS.classes, FLAGS.num_per_class)
  t0 = time.time()
  n_new = sample_lib.run(pipe, labels, FLAGS.seed, FLAGS.cfg, FLAGS.top_k, FLAGS.top_p, False, FLAGS.batch_size,
                         FLAGS.dtype, out_dir=out_dir, shard_index=jax.process_index(),
                         shard_count=jax.process_count(), write_outputs=False)
  dt = time.time() - t0
  if n_new:
    _print(f'generated {n_new} images in {dt:.1f}s ({n_new / dt:.2f} images/s on process {jax.process_index()})')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('var_jax.evaluate: samples written')
  return sample_lib.write_npz(out_dir, labels) if jax.process_index() == 0 else ''


def evaluate(pipe=None) -> Dict[str, Any]:
  """What the flags ask for; returns (and writes) the metrics."""
  import jax
  import numpy as np
  from var_jax import sample as sample_lib
  from var_jax.eval import evaluator
  results: Dict[str, Any] = {}
  want_model = not FLAGS.samples or FLAGS.rfid or FLAGS.test_loss
  if pipe is None and want_model:
    pipe = sample_lib.load_pipeline(FLAGS.vae_ckpt, FLAGS.var_ckpt, FLAGS.checkpoint, FLAGS.patch_nums,
                                    model=FLAGS.model, bae_ckpt=FLAGS.bae_ckpt, model_ckpt=FLAGS.model_ckpt,
                                    model_args=sample_lib.parse_model_args(FLAGS.model_args))
  if (FLAGS.rfid or FLAGS.test_loss) and pipe is not None and sample_lib.model_kind(pipe) != 'var':
    raise ValueError('--rfid and --test_loss are implemented for VAR checkpoints (VQVAE tokenizer) only')
  if (FLAGS.rfid or FLAGS.test_loss) and FLAGS.config is None:
    raise ValueError('--rfid and --test_loss read a data split: give --config=configs/<x>.py (its data section)')
  if not FLAGS.out_dir and not FLAGS.samples:
    raise ValueError('give --out_dir (where samples and metrics.json go) or --samples')
  out_dir = FLAGS.out_dir or os.path.dirname(os.path.abspath(FLAGS.samples))
  os.makedirs(out_dir, exist_ok=True)
  feats = None

  # ---- sample quality ----
  sample_mode = FLAGS.samples or FLAGS.ref or not (FLAGS.rfid or FLAGS.test_loss)
  if sample_mode:
    samples = FLAGS.samples or generate(pipe, os.path.join(out_dir, 'samples'))
    if jax.process_index() == 0:
      feats = _features(FLAGS.inception, FLAGS.inception_batch)
      fake_set = evaluator.ImageSet.open(samples)
      t0 = time.time()
      fake = feats.of_set(fake_set)
      _print(f'Inception features of {len(fake_set)} samples in {time.time() - t0:.1f}s')
      if FLAGS.ref:
        ref = evaluator.load_reference(FLAGS.ref, feats, FLAGS.ref_cache)
        results.update(evaluator.sample_metrics(fake, ref, k=FLAGS.pr_k))
      else:
        logging.warning('no --ref: only the Inception Score is computed')
        from var_jax.eval import metrics
        results['inception_score'], results['inception_score_std'] = metrics.inception_score(
            fake['logits'], splits=min(10, len(fake['logits'])))
        results['num_samples'] = int(len(fake['logits']))
      opts = (sample_lib.sampling_options(sample_lib.model_kind(pipe), cfg=FLAGS.cfg, top_k=FLAGS.top_k,
                                          top_p=FLAGS.top_p) if pipe is not None and not FLAGS.samples else {})
      results['protocol'] = {**opts, 'seed': FLAGS.seed,
                             'num_per_class': FLAGS.num_per_class, 'samples': samples,
                             'reference': FLAGS.ref, 'features': 'FID Inception-v3 (pytorch-fid port), torch resize'}

  # ---- tokenizer rFID ----
  if FLAGS.rfid and jax.process_index() == 0:
    from var_jax.eval import metrics
    split = FLAGS.split or FLAGS.config.data.eval_split
    orig, rec, pix = evaluator.reconstruction_sets(pipe, FLAGS.config.data, split, FLAGS.batch_size,
                                                   FLAGS.max_images)
    feats = feats or _features(FLAGS.inception, FLAGS.inception_batch)
    fo = feats.of_set(evaluator.ImageSet.from_array(orig, f'{split} originals'))['pool3']
    fr = feats.of_set(evaluator.ImageSet.from_array(rec, f'{split} reconstructions'))['pool3']
    results['rfid'] = metrics.frechet_distance(*metrics.feature_statistics(fr), *metrics.feature_statistics(fo))
    results.update({f'recon_{k}': v for k, v in pix.items()})
    results['rfid_split'] = split

  # ---- test loss ----
  if FLAGS.test_loss and jax.process_index() == 0:
    split = FLAGS.split or FLAGS.config.data.eval_split
    bs = FLAGS.batch_size - FLAGS.batch_size % jax.local_device_count() or jax.local_device_count()
    results.update(evaluator.test_loss(pipe, FLAGS.config.data, split, bs, FLAGS.max_batches))
    results['test_split'] = split

  if jax.process_index() == 0:
    path = os.path.join(out_dir, 'metrics.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    os.replace(path + '.tmp', path)
    width = max((len(k) for k in results), default=0)
    for k, v in results.items():
      if not isinstance(v, dict):
        _print(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}')
    _print(f'wrote {path}')
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from var_jax.interop.state_dict import CheckpointMismatchError
  try:
    evaluate()
  except (FileNotFoundError, ValueError, KeyError, CheckpointMismatchError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
