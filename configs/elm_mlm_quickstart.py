r"""Quickstart: a tiny ELM MLM (2 sub-tokens of 8 bits per cell) on the built-in digits, a few minutes on a CPU.

  python -m var_jax.train --config=configs/elm_mlm_quickstart.py --workdir=/tmp/elm_mlm_q
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.tiny_quickstart('elm_mlm')
