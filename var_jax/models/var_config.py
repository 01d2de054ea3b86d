"""Typed model hyperparameters.

Module fields stay small typed values (no ConfigDict inside modules); ``configs/*.py`` files hold the
experiment-level ``ml_collections`` configs and build these with ``VQVAEConfig(**cfg.vae)`` etc.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from var_jax.ops.attention import IMPLEMENTATIONS as ATTN_IMPLS

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
STANDARD_PATCH_NUMS = (PATCH_NUMS_256, PATCH_NUMS_512)


def _as_tuple(x):
  return tuple(int(v) for v in x)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Multi-scale VQVAE (the reference ``VQVAE``; defaults = released ``vae_ch160v4096z32``)."""
  vocab_size: int = 4096
  z_channels: int = 32                      # Cvae
  ch: int = 160
  ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  dropout: float = 0.0
  using_sa: bool = True                     # self-attention at the lowest resolution
  using_mid_sa: bool = True                 # self-attention in the middle block
  beta: float = 0.25                        # commitment loss weight
  using_znorm: bool = False                 # cosine-similarity code lookup
  quant_conv_ks: int = 3
  quant_resi: float = 0.5                   # phi(x) = (1-r) x + r conv(x)
  share_quant_resi: int = 4                 # 0: one phi per scale, 1: one shared, K>1: K phis by tick
  default_qresi_counts: int = 0             # number of phis in mode 0 (0 -> len(patch_nums))
  patch_nums: Tuple[int, ...] = PATCH_NUMS_256

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', _as_tuple(self.ch_mult))
    object.__setattr__(self, 'patch_nums', _as_tuple(self.patch_nums))
    if not self.patch_nums or list(self.patch_nums) != sorted(self.patch_nums):
      raise ValueError(f'patch_nums must be a non-empty increasing sequence, got {self.patch_nums}')
    if self.share_quant_resi < 0:
      raise ValueError(f'share_quant_resi must be >= 0, got {self.share_quant_resi}')
    for c in self.ch_mult:
      if (self.ch * c) % 32:
        raise ValueError(f'ch*ch_mult must be divisible by 32 (GroupNorm groups): ch={self.ch} ch_mult={self.ch_mult}')

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def image_size(self) -> int:
    return self.patch_nums[-1] * self.downsample

  @property
  def num_phis(self) -> int:
    if abs(self.quant_resi) <= 1e-6:
      return 0
    if self.share_quant_resi == 0:
      return self.default_qresi_counts or len(self.patch_nums)
    return self.share_quant_resi  # 1 (shared) or K


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """Scale-causal transformer (the reference ``VAR``; defaults = released d16)."""
  vocab_size: int = 4096
  z_channels: int = 32                      # Cvae of the tokenizer
  num_classes: int = 1000
  depth: int = 16
  embed_dim: int = 1024
  num_heads: int = 16
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6
  shared_aln: bool = False
  cond_drop_rate: float = 0.1
  attn_l2_norm: bool = True
  patch_nums: Tuple[int, ...] = PATCH_NUMS_256
  # Initialisation (reference ``init_weights``); init_std < 0 -> sqrt(1 / (3 C)).
  init_std: float = -1.0
  init_head: float = 0.02
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  remat: bool = False                       # rematerialise each block in training
  attn_impl: str = 'auto'                   # var_jax.ops.attention: 'auto' | 'xla' | 'cudnn' | 'splash'

  def __post_init__(self):
    object.__setattr__(self, 'patch_nums', _as_tuple(self.patch_nums))
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}')
    if self.attn_impl not in ATTN_IMPLS:
      raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}')
    if self.attn_drop_rate:
      raise ValueError('attn_drop_rate > 0 is not supported (the fused attention kernels have no dropout); '
                       'the reference trains with 0.')

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def seq_len(self) -> int:
    return sum(p * p for p in self.patch_nums)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def begin_ends(self) -> Tuple[Tuple[int, int], ...]:
    out, cur = [], 0
    for p in self.patch_nums:
      out.append((cur, cur + p * p))
      cur += p * p
    return tuple(out)

  @property
  def mlp_dim(self) -> int:
    return int(round(self.embed_dim * self.mlp_ratio))

  @property
  def resolved_init_std(self) -> float:
    return self.init_std if self.init_std >= 0 else (1.0 / self.embed_dim / 3) ** 0.5


def var_preset(depth: int, **overrides) -> VARConfig:
  """The released VAR-d{depth} hyperparameters: width 64*depth, heads = depth, drop path 0.1*depth/24.

  d36 is the 512px model with shared AdaLN.
  """
  kw = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
            shared_aln=depth == 36, patch_nums=PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)
  kw.update(overrides)
  return VARConfig(**kw)


def infer_patch_nums(seq_len: int) -> Optional[Tuple[int, ...]]:
  """The standard patch list whose token count is ``seq_len``, or None."""
  for pn in STANDARD_PATCH_NUMS:
    if sum(p * p for p in pn) == seq_len:
      return pn
  return None
