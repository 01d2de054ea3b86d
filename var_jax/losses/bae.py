"""The BAE's codebook loss (the reference ``BinaryAutoEncoder``'s ``code_book_loss``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def codebook_loss_from_probs(probs):
  """The reference's ``code_book_loss``: ``mean(s * (1 - s))`` with ``s = sigmoid(probs)``.

  The sigmoid is applied to the *probabilities* (``proj`` already ends in a Sigmoid), as upstream does, so
  minimising it pushes every probability towards 1 rather than towards 0 or 1. Kept as is for parity; its weight
  (``code_weight``) defaults to 0 upstream.
  """
  s = jax.nn.sigmoid(probs.astype(jnp.float32))
  return jnp.mean(s * (1.0 - s))
