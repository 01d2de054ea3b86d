"""``VARPipeline``: a thin facade over the VQVAE, the VAR transformer and the reference-checkpoint interop.

All the logic lives in the Linen modules (``var_jax.models``) and pure functions; the pipeline holds configs and
params and caches jitted functions so repeated calls do not recompile.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.interop import reference as ref
from var_jax.models.configs import VARConfig, VQVAEConfig
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE


def _check_images(images, cfg: VQVAEConfig, what='images'):
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
    raise ValueError(f'{what} must be NHWC with {cfg.in_channels} channels, got shape {tuple(x.shape)}')
  s = cfg.image_size
  if x.shape[1:3] != (s, s):
    raise ValueError(f'{what} must be {s}x{s} for patch_nums {cfg.patch_nums} '
                     f'(last patch {cfg.patch_nums[-1]} x downsample {cfg.downsample}), got {x.shape[1]}x{x.shape[2]}')
  return x.astype(jnp.float32)


class VARPipeline:
  """Tokenizer + transformer with params, e.g. ``VARPipeline.from_torch('vae.pth', 'var.pth')``."""

  def __init__(self, vae_config: VQVAEConfig, var_config: VARConfig, vae_variables: Dict[str, Any],
               var_variables: Dict[str, Any]):
    if (vae_config.vocab_size, vae_config.z_channels) != (var_config.vocab_size, var_config.z_channels):
      raise ValueError(f'tokenizer (V={vae_config.vocab_size}, Cvae={vae_config.z_channels}) and transformer '
                       f'(V={var_config.vocab_size}, Cvae={var_config.z_channels}) do not fit together')
    if tuple(vae_config.patch_nums) != tuple(var_config.patch_nums):
      raise ValueError(f'patch_nums differ: tokenizer {vae_config.patch_nums} vs transformer {var_config.patch_nums}')
    self.vae_config, self.var_config = vae_config, var_config
    self.vae = VQVAE(vae_config)
    self.var = VAR(var_config)
    self.vae_variables = jax.tree.map(jnp.asarray, vae_variables)
    self.var_variables = jax.tree.map(jnp.asarray, var_variables)
    self._jit_cache: Dict[Any, Any] = {}

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, vae_path: str, var_path: str, patch_nums: Optional[Sequence[int]] = None,
                 num_heads: Optional[int] = None, **var_overrides) -> 'VARPipeline':
    """Load reference checkpoints (``.pth`` or ``.safetensors``); the configs are inferred from the tensors."""
    var_sd = ref.load_state_dict(var_path)
    var_cfg = ref.var_config_from_state_dict(var_sd, patch_nums=patch_nums, num_heads=num_heads, **var_overrides)
    vae_sd = ref.load_state_dict(vae_path)
    vae_cfg = ref.vae_config_from_state_dict(vae_sd, patch_nums=var_cfg.patch_nums)
    try:
      vae_vars = ref.import_vae(vae_sd, vae_cfg)
    except ref.CheckpointMismatchError as e:
      raise ref.CheckpointMismatchError(f'{vae_path}: {e}') from None
    try:
      var_vars = ref.import_var(var_sd, var_cfg)
    except ref.CheckpointMismatchError as e:
      raise ref.CheckpointMismatchError(f'{var_path}: {e}') from None
    return cls(vae_cfg, var_cfg, vae_vars, var_vars)

  @classmethod
  def init_random(cls, vae_config: VQVAEConfig, var_config: VARConfig, rng) -> 'VARPipeline':
    """Fresh weights with the reference's initialisation (for training from scratch, tests and benchmarks)."""
    from flax.core import meta
    k1, k2 = jax.random.split(rng)
    s = vae_config.image_size
    vae_vars = jax.jit(functools.partial(VQVAE(vae_config).init, method=VQVAE.init_all))(
        k1, jnp.zeros((1, s, s, vae_config.in_channels)))
    var_vars = jax.jit(VAR(var_config).init)(k2, jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1, var_config.seq_len - var_config.first_l,
                                                        var_config.z_channels)))
    return cls(vae_config, var_config, meta.unbox(vae_vars), meta.unbox(var_vars))

  # ------------------------------------------------------------------ export
  def save_torch(self, vae_path: Optional[str], var_path: Optional[str]):
    """Write the reference layout (buffers included); ``.pth`` or ``.safetensors`` by extension."""
    if vae_path:
      ref.save_state_dict(ref.export_vae(jax.device_get(self.vae_variables), self.vae_config), vae_path)
    if var_path:
      ref.save_state_dict(ref.export_var(jax.device_get(self.var_variables), self.var_config), var_path)

  # ------------------------------------------------------------------ jitted pieces
  def _fn(self, name: str):
    if name not in self._jit_cache:
      vae, var = self.vae, self.var
      fns = {
          'encode': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_idx),
          'features': lambda v, x: vae.apply(v, x, method=VQVAE.encode_features),
          'fhats': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_fhats),
          'reconstruct': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_reconstructed_img),
          'decode': lambda v, idx: vae.apply(v, idx, method=VQVAE.idx_to_img),
          'var_input': lambda v, idx: vae.apply(v, idx, method=VQVAE.idx_to_var_input),
          'logits': lambda v, labels, x: var.apply(v, labels, x),
      }
      self._jit_cache[name] = jax.jit(fns[name])
    return self._jit_cache[name]

  # ------------------------------------------------------------------ public API
  def encode(self, images) -> List[jax.Array]:
    """images NHWC float32 in [-1, 1] -> tokens per scale, int32 (B, pn*pn), coarsest first."""
    return self._fn('encode')(self.vae_variables, _check_images(images, self.vae_config))

  def encode_features(self, images) -> jax.Array:
    """``quant_conv(encoder(images))``, (B, h, w, Cvae)."""
    return self._fn('features')(self.vae_variables, _check_images(images, self.vae_config))

  def fhats(self, images) -> List[jax.Array]:
    """Accumulated quantized feature after every scale, each (B, h, w, Cvae)."""
    return self._fn('fhats')(self.vae_variables, _check_images(images, self.vae_config))

  def reconstruct(self, images) -> jax.Array:
    """NHWC in [-1, 1] -> reconstruction NHWC in [-1, 1] (all scales)."""
    return self._fn('reconstruct')(self.vae_variables, _check_images(images, self.vae_config))

  def decode(self, tokens) -> jax.Array:
    """Tokens (list per scale, or concatenated (B, L)) -> images NHWC in [-1, 1]."""
    return self._fn('decode')(self.vae_variables, self.split_tokens(tokens))

  def var_input(self, tokens) -> jax.Array:
    """Teacher-forcing input (B, L - first_l, Cvae) from tokens."""
    return self._fn('var_input')(self.vae_variables, self.split_tokens(tokens))

  def logits(self, labels, tokens) -> jax.Array:
    """Teacher-forced logits (B, L, V) float32 (no label dropout)."""
    toks = self.split_tokens(tokens)
    labels = self._check_labels(labels, toks[0].shape[0])
    return self._fn('logits')(self.var_variables, labels, self.var_input(toks))

  # ------------------------------------------------------------------ helpers
  def split_tokens(self, tokens) -> List[jax.Array]:
    """Accept a list of (B, pn^2) per scale or a (B, L) array; check the shapes; return the list."""
    pns = self.var_config.patch_nums
    if isinstance(tokens, (list, tuple)):
      toks = [jnp.asarray(t, jnp.int32) for t in tokens]
      want = [p * p for p in pns]
      got = [t.shape[-1] if t.ndim == 2 else None for t in toks]
      if got != want:
        raise ValueError(f'token maps must be (B, pn^2) for patch_nums {pns}: expected lengths {want}, got '
                         f'{[tuple(t.shape) for t in toks]}')
    else:
      t = jnp.asarray(tokens, jnp.int32)
      if t.ndim != 2 or t.shape[1] != self.var_config.seq_len:
        raise ValueError(f'tokens must be (B, {self.var_config.seq_len}), got shape {tuple(t.shape)}')
      toks = [t[:, b:e] for b, e in self.var_config.begin_ends]
    return toks

  def _check_labels(self, labels, batch: int):
    labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    if labels.shape[0] != batch:
      raise ValueError(f'{labels.shape[0]} labels for a batch of {batch}')
    lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
    if lo < 0 or hi > self.var_config.num_classes:
      raise ValueError(f'class labels must lie in [0, {self.var_config.num_classes}] '
                       f'({self.var_config.num_classes} = unconditional), got [{lo}, {hi}]')
    return labels
