r"""BAE quickstart: a small binary autoencoder (K = 16 bits on a 4x4 grid) on scikit-learn's bundled digits, CPU.

  python -m var_jax.train --config=configs/bae_quickstart.py --workdir=/tmp/bae_quickstart
writes binaryae.safetensors (+ binaryae.th with torch) and binaryae_ema.* in the reference layout
(``var_jax.interop.bae.load_bae(path, resolution=32)``). The release recipe of configs/bae_k16.py, shrunk: 32px,
nf 32, ch_mult 1,1,2,2 (8x downsampling), one res block per level, attention at the 4x4 level; LPIPS off (its VGG
weights are a user-given file); the GAN (BatchNorm PatchGAN, 2 layers, weight 0.1) starts at step 200.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bae_k16', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bae_k16.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)   # configs are loaded by path, not as a package


def get_config():
  c = _base.release(16, resolution=32)
  c.data.update(name='digits', image_size=32, mid_reso=1.0, num_workers=0, hflip=False)
  c.bae.update(nf=32, ch_mult=(1, 1, 2, 2), res_blocks=1, attn_resolutions=(4,), emb_dim=32)
  c.global_batch_size = 32
  c.total_steps = -1
  c.epochs = 6.0
  c.loss.update(lpips=0.0, gan=0.1, disc_start=200)   # full weight (the release's 1.0) derails this tiny model
  c.disc.update(ndf=32, n_layers=2, norm='batch')
  c.optim_g.update(lr=3e-4, b1=0.9, b2=0.99, warmup_steps=20)
  c.optim_d.update(lr=3e-4, b1=0.5, b2=0.9)
  c.ema.update(decay=0.98, every=1)
  c.log_every = 20
  c.ckpt_every = 200
  c.sample_every = 200
  return c
