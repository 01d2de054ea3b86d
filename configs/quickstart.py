r"""Quickstart VAR: a tiny VAR on scikit-learn's bundled digits (no download); the generator stage of
``configs/digits.py`` (README's main job), which trains its tokenizer (``configs/vqvae_quickstart.py``) first.

  python -m var_jax.train --config=configs/digits.py --workdir=/tmp/digits            # tokenizer, then this
  python -m var_jax.train --config=configs/quickstart.py --workdir=/tmp/var_q \
      --config.vae_ckpt=/tmp/digits/tokenizer/vqvae.safetensors                       # this stage alone

Images are upsampled 8x8 -> 32x32 (4 scales: 1, 2, 3, 4); transformer: depth 4, width 128. Without ``vae_ckpt`` the
tokenizer is a random-init VQVAE (the machinery runs, the samples are noise).

The recipe, chosen by the digits quality score (``var_jax.eval.digits``; 50 samples per class, class accuracy and
Frechet distance / the real data's, on one trained tokenizer; README's quality table has the final numbers):
  the first quickstart (base_lr 1e-3 = lr 2.5e-4 at batch 64, 8 epochs; cfg 1.5, top-k 50)    12.8%  2.63x
  base_lr 4e-3 (lr 1e-3), 8 epochs                                                             63.2%  2.35x
  base_lr 4e-3, 24 epochs                                                                      99.8%  2.41x
  base_lr 8e-3 (lr 2e-3), 24 epochs                                                           100.0%  2.18x
  + sampling at cfg 0.5, no top-k (guidance sharpens and narrows: cfg 0 97.2% 1.81x, 1.0 99.8% 2.06x)  99.6%  1.91x
  on the tokenizer trained at lr 1e-3 (configs/vqvae_quickstart.py; reconstructions 1.34x, not 1.54x)   98.6%  1.48x
The learning rate was what kept the first quickstart from learning the class (a 4-layer, 128-wide model wants a
~10x larger rate than the reference's ImageNet recipe gives it at this batch); the rest of the distance to the real
digits is mostly the tokenizer's (its reconstructions of real digits score ~1.5x).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  c = common.base()
  pn = (1, 2, 3, 4)
  c.data.update(name='digits', image_size=32, num_workers=0, eval_split='val', mid_reso=1.125)
  # the tokenizer of configs/vqvae_quickstart.py (cosine code lookup: its collapse mitigation)
  c.vae.update(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=pn,
               using_znorm=True)
  c.vae_ckpt = ''
  c.model.update(vocab_size=256, z_channels=16, num_classes=10, depth=4, embed_dim=128, num_heads=2,
                 drop_path_rate=0.0, patch_nums=pn)
  c.dtype = 'float32'
  c.global_batch_size = 64
  c.epochs = 24.0                      # 576 steps, ~2.5 minutes on a 2-core CPU
  c.optim.update(base_lr=8e-3, end_ratio=0.1, warmup_epochs=0.5)   # lr = 8e-3 x 64 / 256 = 2e-3
  c.log_every = 10
  c.ckpt_every = 100
  c.eval_every = 100
  c.eval_batches = 4
  c.sample_every = 192
  c.sample_classes = tuple(range(10))
  c.sample.update(cfg=0.5, top_k=0, top_p=0.0)   # the quality table above
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
