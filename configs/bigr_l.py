"""BiGR-L on the d24 BAE (24-bit codes), the reference script/train.sh recipe on ImageNet 256px.

  python -m var_jax.train --config=configs/bigr_l.py --workdir=gs://bucket/bigr_l \\
      --config.data.path=/data/imagenet --config.bae_ckpt=/ckpt/bae_d24/binaryae_ema_1000000.th
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.bigr_recipe('BiGR-L', code_bits=24)
