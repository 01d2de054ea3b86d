r"""The released binary autoencoder with K = 32 bits per latent cell, 256px: configs/bae_k16.py's recipe with K = 32.

  python -m var_jax.train --config=configs/bae_k32.py --workdir=gs://bucket/bae_k32 \
      --config.data.path=/data/imagenet --config.loss.lpips_path=/ckpt/lpips_vgg.safetensors
BiGR releases it (d32, 65,534,758 parameters) and a 512px one (d32-512, 61,328,166): add
--config.data.image_size=512 --config.bae.resolution=512 (the lowest level is then 32x32: no per-level attention).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bae_k16', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bae_k16.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)   # configs are loaded by path, not as a package


def get_config():
  return _base.release(32)
