"""Table rows and config-inference helpers for the Llama blocks (``var_jax.models.llama``) of ELM and BiGR."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from var_jax.interop.state_dict import Entry, dense_entries, param_entry
from var_jax.models.llama import ffn_hidden_dim

MULTIPLE_OF_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def block_entries(key: str, path: Tuple[str, ...], dim: int, qkv_rows: int, ffn_hidden: int) -> List[Entry]:
  """A reference ``TransformerBlock`` (attention, SwiGLU feed-forward, the two RMSNorms), in its order."""
  e = dense_entries(f'{key}.attention.wqkv', path + ('attention', 'wqkv'), dim, qkv_rows, bias=False)
  e += dense_entries(f'{key}.attention.wo', path + ('attention', 'wo'), dim, dim, bias=False)
  e += dense_entries(f'{key}.feed_forward.w1', path + ('feed_forward', 'w1'), dim, ffn_hidden, bias=False)
  e += dense_entries(f'{key}.feed_forward.w3', path + ('feed_forward', 'w3'), dim, ffn_hidden, bias=False)
  e += dense_entries(f'{key}.feed_forward.w2', path + ('feed_forward', 'w2'), ffn_hidden, dim, bias=False)
  e.append(param_entry(f'{key}.attention_norm.weight', (dim,), path + ('attention_norm', 'weight')))
  e.append(param_entry(f'{key}.ffn_norm.weight', (dim,), path + ('ffn_norm', 'weight')))
  return e


def infer_multiple_of(dim: int, hidden: int, ffn_dim_multiplier: Optional[float],
                      candidates: Sequence[int] = MULTIPLE_OF_CANDIDATES) -> Optional[int]:
  """The first ``multiple_of`` in ``candidates`` that gives the stored SwiGLU width ``hidden``, or None."""
  for m in candidates:
    if ffn_hidden_dim(dim, m, ffn_dim_multiplier) == hidden:
      return m
  return None
