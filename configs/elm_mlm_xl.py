"""ELM MLM GPT-XL, vocabulary 1-16 (the released MLM models; K = 16 bit BAE), ImageNet 256px.

  python -m var_jax.train --config=configs/elm_mlm_xl.py --workdir=gs://bucket/elm_mlm_xl \\
      --config.data.path=/data/imagenet --config.bae_ckpt=/ckpt/bae_16/binaryae_ema.th
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.elm_recipe('XL', 'mlm', token_each=1, code_dim=16)
