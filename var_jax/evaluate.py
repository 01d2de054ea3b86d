r"""Evaluate VAR models and tokenizers: ``python -m var_jax.evaluate``.

Sample-quality metrics (FID, Inception Score, precision/recall k=3) of a class-conditional model, with the paper's
protocol fixed in code: 50 images per class, cfg 1.5, top-k 900, top-p 0.96, no smoothing, every image written as
PNG and read back (uint8 round trip), the FID Inception-v3. See ``var_jax/eval/evaluator.py`` for the details and
for how the numbers relate to OpenAI's evaluator (whose input, ``samples.npz``, is written too).

  # 50k samples from released weights, sharded over all devices, then FID/IS/P/R vs OpenAI's reference batch
  python -m var_jax.evaluate --vae_ckpt=vae_ch160v4096z32.pth --var_ckpt=var_d16.pth \
      --out_dir=eval_d16 --ref=VIRTUAL_imagenet256_labeled.npz --inception=pt_inception-2015-12-05-6726825d.pth \
      --ref_cache=imagenet256_ref_stats.npz
  # an ELM / BiGR training run directory (its model_args.json); the family's release sampling settings
  python -m var_jax.evaluate --checkpoint=/tmp/bigr_q --num_per_class=50 --out_dir=eval_bigr_q --ref=... \
      --inception=...
  # a model trained on the built-in digits (configs/digits.py): the digits quality score, no Inception
  python -m var_jax.evaluate --digits --checkpoint=/tmp/digits/var/model --out_dir=eval_digits
  # an existing folder or .npz of samples
  python -m var_jax.evaluate --samples=eval_d16/samples.npz --ref=... --inception=...
  # tokenizer rFID (+ PSNR) on a data split, and VAR's test loss / token accuracy (scaling-law quantities)
  python -m var_jax.evaluate --config=configs/quickstart.py --checkpoint=workdir/model --rfid --test_loss \
      --inception=... --out_dir=eval_q

The Inception weights are never downloaded: pass pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the
``.safetensors`` that ``python -m var_jax.eval.inception`` converts it to). Results go to ``<out_dir>/metrics.json``.

Multi-host (``var_jax.distributed``): run the same command on every process; the samples are split over the
processes (image i on process i % count, into an --out_dir all share), process 0 computes the features and the
metrics and writes samples.npz and metrics.json.
"""
from __future__ import annotations

from absl import flags

from var_jax import cli

def define_flags():
  """The metric flags beyond the model and protocol ones of ``var_jax.cli``."""
  from ml_collections import config_flags
  cli.define_model_flags()
  flags.DEFINE_string('samples', None, 'evaluate these samples (folder of images or .npz with arr_0) instead of '
                      'generating')
  cli.define_sampling_flags(num_per_class=50, batch_size=64)     # the paper's protocol: 50 x 1000 classes
  flags.DEFINE_string('inception', None, 'FID Inception-v3 weights: pytorch-fid .pth or its converted .safetensors')
  flags.DEFINE_integer('inception_batch', 200, 'images per Inception call (split over local devices)')
  flags.DEFINE_string('ref', None, 'reference batch: OpenAI .npz (arr_0 images and/or mu/sigma), a statistics .npz '
                      'or a folder of images')
  flags.DEFINE_string('ref_cache', None, 'store/reuse the reference statistics + features here (.npz)')
  flags.DEFINE_integer('pr_k', 3, 'k of the k-NN manifolds of precision/recall')
  flags.DEFINE_string('is_split', 'chunks5000', 'Inception Score split rule: chunks<N> (consecutive chunks of N, '
                      'OpenAI\'s evaluator: chunks5000) or equal<N> (N equal splits, improved-GAN: equal10)')
  flags.DEFINE_enum('pr_distance_dtype', 'float16', ['float16', 'float32'], 'precision/recall distances: float16 '
                    '(OpenAI\'s evaluator) or float32')
  flags.DEFINE_bool('rfid', False, 'tokenizer rFID + PSNR: reconstructions vs originals of --split (needs --config)')
  flags.DEFINE_integer('max_images', -1, '--rfid: at most this many images (-1: the whole split)')
  flags.DEFINE_bool('test_loss', False, 'VAR teacher-forced loss / token accuracy over --split (needs --config)')
  flags.DEFINE_integer('max_batches', -1, '--test_loss: at most this many batches (-1: the whole split)')
  flags.DEFINE_string('split', None, 'data split for --rfid/--test_loss (default: config.data.eval_split)')
  flags.DEFINE_string('out_dir', None, 'samples (PNGs + samples.npz) and metrics.json go here')
  flags.DEFINE_bool('digits', False, 'the digits quality score (var_jax.eval.digits: class accuracy by a classifier of '
                    'the real training split, Frechet distance in its PCA space; not FID, no Inception) of a model '
                    'trained on the built-in digits; the data view from --config, else from the run\'s config.json')
  config_flags.DEFINE_config_file('config', None, 'training config (its data section) for --rfid / --test_loss',
                                  lock_config=False)


def _is_bits_run(path: str) -> bool:
  from var_jax.pipelines.base import is_bits_run
  try:
    return is_bits_run(path)
  except OSError:
    return False


def main():
  from var_jax import fileio
  from var_jax.eval import evaluator
  f = cli.FLAGS
  cli.check_sampling_flags()                 # flags and the destination checked before a model is loaded
  if f.out_dir:
    fileio.check_output_dir(f.out_dir, '--out_dir')
  if f.out_dir and not f.samples:            # the samples folder's recorded plan vs the flags (eval.protocol)
    import os
    from var_jax.eval import protocol
    protocol.check_folder_request(os.path.join(f.out_dir, 'samples'), seed=f.seed, dtype=f.dtype, classes=f.classes,
                                  num_per_class=f.num_per_class, overwrite=f.overwrite,
                                  settings={'cfg': f.cfg, 'top_k': f.top_k, 'top_p': f.top_p})
  view = None
  if f.digits:                               # the view the model trained on, before any model is loaded
    from var_jax.eval import digits
    view = digits.view_of(f.config, f.checkpoint or f.samples)
  if (f.rfid or f.test_loss) and (f.model in ('elm', 'bigr') or f.bae_ckpt or f.model_ckpt or (
      f.checkpoint and _is_bits_run(f.checkpoint))):      # the family from the flags / run dir, before loading
    raise ValueError('--rfid and --test_loss are implemented for VAR checkpoints (VQVAE tokenizer) only')
  # every metric flag, input path and image count, before a model is loaded or a network run
  evaluator.check_request(
      out_dir=f.out_dir, samples=f.samples, ref=f.ref, ref_cache=f.ref_cache, inception=f.inception,
      inception_batch=f.inception_batch, pr_k=f.pr_k, is_split=f.is_split, pr_distance_dtype=f.pr_distance_dtype,
      rfid=f.rfid, test_set_loss=f.test_loss, has_data_config=f.config is not None, max_images=f.max_images,
      max_batches=f.max_batches, digits=f.digits,
      num_generated=None if f.samples else evaluator.planned_count(f.classes, f.num_per_class))
  pipe = cli.load_pipeline_from_flags() if not f.samples or f.rfid or f.test_loss else None
  if not f.samples:                          # VAR: --cfg_until / --prune / --drafter_checkpoint where it samples
    pipe = cli.with_fast_sampling_from_flags(pipe)
  evaluator.evaluate(
      pipe, out_dir=f.out_dir, samples=f.samples, ref=f.ref, ref_cache=f.ref_cache, inception=f.inception,
      inception_batch=f.inception_batch, pr_k=f.pr_k, rfid=f.rfid, test_set_loss=f.test_loss,
      data_config=f.config.data if f.config is not None else None, split=f.split, max_images=f.max_images,
      max_batches=f.max_batches, classes=f.classes, num_per_class=f.num_per_class, cfg=f.cfg, top_k=f.top_k,
      top_p=f.top_p, seed=f.seed, batch_size=f.batch_size, dtype=f.dtype, is_split=f.is_split,
      pr_distance_dtype=f.pr_distance_dtype, digits_view=view, overwrite=f.overwrite,
      log=lambda msg: print(msg, flush=True))


if __name__ == '__main__':
  from var_jax.fileio import OutputError
  from var_jax.interop.state_dict import CheckpointMismatchError
  define_flags()
  cli.run(main, errors=(FileNotFoundError, ValueError, KeyError, CheckpointMismatchError, OutputError), multihost=True)
