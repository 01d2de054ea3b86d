"""ELM AR GPT-2B, vocabulary 2-12 (K = 24 bit BAE), the reference train.sh recipe on ImageNet 256px.

  python -m var_jax.train --config=configs/elm_ar_2b.py --workdir=gs://bucket/elm_ar_2b \\
      --config.data.path=/data/imagenet --config.bae_ckpt=/ckpt/bae_24/binaryae_ema.th
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.elm_recipe('2B', 'ar', token_each=2, code_dim=12)
