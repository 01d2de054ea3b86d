r"""VAR-d36 on ImageNet 512x512 (shared AdaLN), the reference recipe.

  python -m var_jax.train --config=configs/var_d36.py --workdir=gs://bucket/var_d36 \
      --config.data.path=/data/imagenet --config.vae_ckpt=/ckpt/vae_ch160v4096z32.pth
FSDP over every chip with rematerialised blocks (docs/aot.md); where the recipe batch still does not fit,
micro-batch it: --config.grad_accum=2.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  return common.var_recipe(36)
