r"""VAR-d24 on ImageNet 256x256, the reference recipe.

  python -m var_jax.train --config=configs/var_d24.py --workdir=gs://bucket/var_d24 \
      --config.data.path=/data/imagenet --config.vae_ckpt=/ckpt/vae_ch160v4096z32.pth
Params, AdamW state and EMA are sharded over every chip (FSDP, mesh.data=1 mesh.fsdp=-1): docs/aot.md.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  return common.var_recipe(24)
