"""Compute-dtype names as configs and flags spell them, validated: a typo is an error, never a silent float32."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def parse_dtype(name, what: str = 'dtype'):
  """'float32' | 'bfloat16' | 'float16' (or the jnp dtype itself) -> the jnp dtype; ``what`` names the setting in
  the error (e.g. 'config.dtype')."""
  if not isinstance(name, str):
    for k, v in DTYPES.items():
      if jnp.dtype(name) == jnp.dtype(v):
        return v
  elif name in DTYPES:
    return DTYPES[name]
  raise ValueError(f'{what}={name!r}: expected one of {", ".join(DTYPES)}')
