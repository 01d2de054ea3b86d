"""var_jax: VAR (Visual AutoRegressive modeling, next-scale prediction) in JAX/Flax, and its binary-latent
siblings ELM (AR / MLM over binary-autoencoder bits) and BiGR.

Never imports torch: the reference-checkpoint interop imports it lazily, only for ``.pth`` files.
"""
from var_jax.models.var_config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig, var_preset
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.pipelines.bigr import BiGRPipeline
from var_jax.pipelines.elm import ELMPipeline
from var_jax.pipelines.var import VARPipeline

__version__ = '0.1.0'
__all__ = ['VARPipeline', 'ELMPipeline', 'BiGRPipeline', 'VAR', 'VQVAE', 'VARConfig', 'VQVAEConfig', 'var_preset',
           'PATCH_NUMS_256', 'PATCH_NUMS_512']
