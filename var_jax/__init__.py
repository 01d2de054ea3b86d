"""var_jax: VAR (Visual AutoRegressive modeling, next-scale prediction) in JAX/Flax.

Never imports torch: the reference-checkpoint interop imports it lazily, only for ``.pth`` files.
"""
from var_jax.models.configs import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig, var_preset
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.pipeline import VARPipeline

__version__ = '0.1.0'
__all__ = ['VARPipeline', 'VAR', 'VQVAE', 'VARConfig', 'VQVAEConfig', 'var_preset', 'PATCH_NUMS_256',
           'PATCH_NUMS_512']
