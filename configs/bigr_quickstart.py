r"""Quickstart: a tiny BiGR (16-bit codes, T = 64 diffusion steps) on the built-in digits, a few minutes on a CPU.

  python -m var_jax.train --config=configs/bigr_quickstart.py --workdir=/tmp/bigr_q
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.tiny_quickstart('bigr')
