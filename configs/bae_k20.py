r"""The released binary autoencoder with K = 20 bits per latent cell, 256px: configs/bae_k16.py's recipe with K = 20.

  python -m var_jax.train --config=configs/bae_k20.py --workdir=gs://bucket/bae_k20 \
      --config.data.path=/data/imagenet --config.loss.lpips_path=/ckpt/lpips_vgg.safetensors
ELM releases it (bae_20, the tokenizer of its 2-10 models); 65,528,602 parameters.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bae_k16', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bae_k16.py'))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)   # configs are loaded by path, not as a package


def get_config():
  return _base.release(20)
