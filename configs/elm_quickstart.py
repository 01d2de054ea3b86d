r"""Quickstart: a tiny ELM AR (2 sub-tokens of 8 bits per cell) on the built-in digits, a few minutes on a CPU.

  python -m var_jax.train --config=configs/elm_quickstart.py --workdir=/tmp/elm_q

Writes metrics, checkpoints, ``model.pth`` (reference layout, EMA weights), ``model_args.json`` and the random-init
tokenizer ``binaryae.th`` into the workdir. Set ``--config.bae_ckpt`` to a trained BAE for meaningful codes.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_bits_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bits_common.py'))
bits_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bits_common)   # configs are loaded by path, not as a package


def get_config():
  return bits_common.tiny_quickstart('elm_ar')
