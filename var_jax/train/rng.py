"""Named PRNG streams of training. Every random draw is a pure function of (seed, step, stream) — or, in eval, of
(seed, eval batch index) — so a resumed run repeats an uninterrupted one and the draws do not depend on the mesh
(threefry keys are partitionable).

  step_key(seed, step)            fold_in(key(seed), step): the step's root (VAR dropout / drop path / label dropout;
                                  ELM/BiGR split it into (bits, model) keys; the tokenizer's dropout)
  stream(key, name)               fold_in(key, STREAMS[name]): a named sub-stream of a step key
  eval_key(seed, i)               fold_in(fold_in(key(seed), EVAL_SALT), i): eval batch i (fixed across evals, so
                                  evals at different steps are comparable); no train step reaches EVAL_SALT
"""
from __future__ import annotations

import jax

STREAMS = {'codebook_restart': 1, 'bernoulli_bits': 2}
EVAL_SALT = 0xFFFFFFFF


def step_key(seed: int, step) -> jax.Array:
  return jax.random.fold_in(jax.random.key(int(seed)), step)


def stream(key: jax.Array, name: str) -> jax.Array:
  if name not in STREAMS:
    raise KeyError(f'unknown PRNG stream {name!r}: one of {sorted(STREAMS)}')
  return jax.random.fold_in(key, STREAMS[name])


def eval_key(seed: int, batch_index) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), EVAL_SALT), batch_index)
