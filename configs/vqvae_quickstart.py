r"""Tokenizer quickstart: a small multi-scale VQVAE on scikit-learn's bundled digits, on a laptop CPU in minutes.

  python -m var_jax.train --config=configs/digits.py --workdir=/tmp/digits     # this, then VAR on its tokens
  python -m var_jax.train --config=configs/vqvae_quickstart.py --workdir=/tmp/vqvae_quickstart   # this alone
LPIPS is off here (its VGG weights are a user-given file); the GAN loss starts at step 300.

Codebook collapse mitigation, chosen by measurement (benchmarks/codebook_usage.py, 300 steps, final per-scale usage
% for scales 1x1 / 2x2 / 3x3 / 4x4, and L1):
  baseline                       0.4 /  3.1 /   5.9 /  22.3   L1 0.158
  dead-code restart (every 50)   6.6 / 25.0 /  26.6 /  97.3   L1 0.143
  cosine lookup (using_znorm)    0.4 / 65.6 / 100.0 / 100.0   L1 0.156
  cosine lookup + restart        0.8 / 69.1 /  99.6 / 100.0   L1 0.149   <- used here
The 1x1 scale stays collapsed in every variant (one global-mean code per image on digits).

Generator lr 1e-3 (was 3e-4): PSNR 20.4 instead of 19.0 after the same 376 steps, and its reconstructions of 50 real
training digits per class score a Frechet distance (var_jax.eval.digits) of 1.34x the real data's instead of 1.54x:
the floor under the VAR stage's samples (configs/quickstart.py).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  c = common.tokenizer_base()
  c.data.update(name='digits', image_size=32, num_workers=0, hflip=False)
  # the quickstart VAR's tokenizer (configs/quickstart.py): V=256, Cvae=16, 32px -> patch_nums 1,2,3,4
  c.vae.update(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4),
               using_znorm=True)
  c.global_batch_size = 32
  c.epochs = 8.0
  c.loss.update(lpips=0.0, gan=0.1, disc_start=300)
  c.disc.update(ndf=32, n_layers=2, norm='group')
  c.optim_g.update(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=20)
  c.optim_d.update(lr=3e-4, b1=0.5, b2=0.9)
  c.codebook.restart_every = 50
  c.log_every = 20
  c.ckpt_every = 200
  c.sample_every = 200
  return c
