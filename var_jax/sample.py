r"""Sample images from a VAR, ELM or BiGR model: ``python -m var_jax.sample``.

Examples:
  # a labelled grid from the released weights (reference .pth or .safetensors)
  python -m var_jax.sample --vae_ckpt=vae_ch160v4096z32.pth --var_ckpt=var_d16.pth \
      --classes=207,360,387,974,88,979,417,279 --cfg=4 --top_k=900 --top_p=0.95 --out=grid.png
  # 50 per class over all classes, one PNG each + an .npz for OpenAI's FID evaluator; rerunning resumes
  python -m var_jax.sample --checkpoint=workdir/model --num_per_class=50 --out_dir=samples --batch_size=64
  # any family's training run directory: VAR's workdir (its model/), ELM's or BiGR's (model_args.json names the
  # exported model, its ModelArgs and the tokenizer, so the images have the size the run trained on)
  python -m var_jax.sample --checkpoint=/tmp/elm_q --num_per_class=2 --out_dir=elm_samples

  # ELM (AR or MLM, inferred from the keys) and BiGR: the binary autoencoder + the generator; --model_args takes the
  # reference ModelArgs fields the tensors cannot tell (unset: a model_args.json beside --model_ckpt gives them)
  python -m var_jax.sample --bae_ckpt=binaryae_ema.th --model_ckpt=L-2-10.pth --classes=207,360 --out=elm.png
  python -m var_jax.sample --bae_ckpt=bae_24.th --model_ckpt=bigr_L_d24.pt --model_args=p_flip=true --out=bigr.png

Sampling settings left unset take each model's release defaults (VAR: cfg 1.5, top-k 900, top-p 0.96; ELM: linear
cfg 4.0, top-k 1000; BiGR: cfg 3.0, 20 iterations, Gumbel 0.01).

Every image i draws from fold_in(PRNGKey(seed), i), so a resumed run (existing PNGs are skipped) produces exactly
the images an uninterrupted one would, whatever the batch size or device count. Run the same command on every
process of a multi-host job (``var_jax.distributed``): image i is sampled on process i % count, --out_dir must be
a folder all processes share, and process 0 writes the grid and samples.npz once all are done.

An --out_dir records what its images are (sample_plan.json: the model's configs and a fingerprint of its weights,
every sampling setting, seed, dtype, labels). A rerun with the same plan resumes; any other (another checkpoint,
--cfg, --seed, --classes, --num_per_class, ...) is refused with one line naming the difference, before any image
is sampled; --overwrite deletes the folder's earlier samples (PNGs, samples.npz, plan; nothing else) and starts
over. PNGs outside the plan are never put into samples.npz.
"""
from __future__ import annotations

from absl import flags

from var_jax import cli

def define_flags():
  """The sampling flags beyond the model and protocol ones of ``var_jax.cli``."""
  cli.define_model_flags()
  cli.define_sampling_flags(num_per_class=1, batch_size=32)
  flags.DEFINE_integer('grid_cols', 8, 'columns of the --out grid')
  flags.DEFINE_string('cfg_schedule', None, 'ELM/BiGR: CFG schedule (ELM default linear, BiGR constant)')
  flags.DEFINE_float('temperature', None, 'ELM/BiGR sampling temperature')
  flags.DEFINE_integer('num_iter', None, 'ELM MLM / BiGR decoding iterations')
  flags.DEFINE_integer('infer_steps', None, 'BiGR diffusion inference steps')
  flags.DEFINE_float('gumbel_temp', None, 'BiGR Gumbel temperature of the unmasking order')
  flags.DEFINE_string('gumbel_schedule', None, 'BiGR Gumbel schedule: constant, down, up')
  flags.DEFINE_bool('more_smooth', False, 'Gumbel-softmax smoothing (visualisation only; not for FID)')
  flags.DEFINE_string('out', None, 'write one labelled grid PNG here')
  flags.DEFINE_string('out_dir', None, 'write one PNG per image and samples.npz (arr_0: uint8 NHWC) here')


def main():
  from var_jax.eval import protocol
  f = cli.FLAGS
  cli.check_sampling_flags()                 # every flag and destination checked before a model is loaded
  protocol.check_destinations(f.out, f.out_dir)
  extra = {k: getattr(f, k) for k in ('cfg_schedule', 'temperature', 'num_iter', 'infer_steps', 'gumbel_temp',
                                      'gumbel_schedule')}
  # the folder's recorded plan against what the flags decide, before loading (the rest once the model is loaded)
  protocol.check_folder_request(f.out_dir, seed=f.seed, dtype=f.dtype, classes=f.classes,
                                num_per_class=f.num_per_class, overwrite=f.overwrite,
                                settings={'cfg': f.cfg, 'top_k': f.top_k, 'top_p': f.top_p,
                                          'more_smooth': f.more_smooth, **extra})
  pipe = cli.with_fast_sampling_from_flags(cli.load_pipeline_from_flags())
  labels = protocol.sample_plan(pipe.num_classes, f.classes, f.num_per_class)
  protocol.generate_samples(pipe, f.out_dir, labels, seed=f.seed, cfg=f.cfg, top_k=f.top_k, top_p=f.top_p,
                            more_smooth=f.more_smooth, options=extra, batch_size=f.batch_size, dtype=f.dtype,
                            out=f.out, grid_cols=f.grid_cols, log=lambda msg: print(msg, flush=True),
                            overwrite=f.overwrite)


if __name__ == '__main__':
  from var_jax.fileio import OutputError
  from var_jax.interop.state_dict import CheckpointMismatchError
  define_flags()
  cli.run(main, errors=(FileNotFoundError, ValueError, CheckpointMismatchError, OutputError), multihost=True)
