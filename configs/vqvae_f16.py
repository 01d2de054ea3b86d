r"""The released tokenizer's architecture (vae_ch160v4096z32: V=4096, Cvae=32, ch=160, patch_nums 1..16, phi
sharing 4) trained on ImageNet 256px with L1 + VQ + LPIPS + PatchGAN.

  python -m var_jax.train --config=configs/vqvae_f16.py --workdir=gs://bucket/vqvae \
      --config.data.path=/data/imagenet --config.loss.lpips_path=/ckpt/lpips_vgg.safetensors
Fine-tune the released weights: --config.init_from=/ckpt/vae_ch160v4096z32.pth
Collapse mitigation: dead-code restart (the lookup stays the reference's squared-L2 one, so the result drops into
the reference VAR code unchanged); --config.vae.using_znorm=True adds cosine lookup (see configs/vqvae_quickstart.py
for the measurement; a cosine-lookup tokenizer must then be loaded with using_znorm=True everywhere).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  c = common.tokenizer_base()
  c.data.update(image_size=256, hflip=True)
  c.global_batch_size = 256
  c.epochs = 100.0
  c.loss.update(disc_start=20000)
  c.optim_g.update(lr=1e-4, warmup_steps=5000)
  c.optim_d.update(lr=1e-4, warmup_steps=5000)
  c.codebook.restart_every = 1000
  return c
