"""What the three families' samplers share: PRNG keys per sample, class labels, param casting, top-k / top-p."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------- argument validation
# name -> (kind, low, low inclusive, high, high inclusive, None allowed): the numeric sampling arguments of every
# family's ``sample``/``edit`` and of the CLIs (flag = ``--`` + name). Family-specific limits (e.g. BiGR's
# infer_steps <= n_sample_steps) stay in the pipelines.
SAMPLING_ARGS = {
    'cfg': ('float', 0.0, True, None, False, True),
    'top_k': ('int', 0, True, None, False, True),
    'top_p': ('float', 0.0, True, 1.0, True, True),
    'temperature': ('float', 0.0, True, None, False, True),     # > 0 where it divides logits (pipelines)
    'gumbel_temp': ('float', 0.0, True, None, False, True),
    'scale_pow': ('float', None, False, None, False, True),
    'num_iter': ('int', 1, True, None, False, True),
    'infer_steps': ('int', 1, True, None, False, True),
    'batch_size': ('int', 1, True, None, False, True),
    'num_samples': ('int', 1, True, None, False, True),
    'num_per_class': ('int', 1, True, None, False, False),
    'grid_cols': ('int', 1, True, None, False, False),
    'seed': ('int', 0, True, 2 ** 32, False, False),
    'more_smooth': ('bool', None, False, None, False, False),
    'cfg_until': ('int', 0, True, None, False, True),           # < the number of scales: checked by the sampler
    'draft_scales': ('int', 1, True, None, False, True),        # < the number of scales: checked by the sampler
}


def _describe(kind, lo, lo_in, hi, hi_in) -> str:
  what = {'float': 'a finite number', 'int': 'an integer', 'bool': 'a bool (True/False)'}[kind]
  if lo is not None and hi is not None:
    return f'{what} in {"[" if lo_in else "("}{lo}, {"2^32" if hi == 2 ** 32 else hi}{"]" if hi_in else ")"}'
  if lo is not None:
    return f'{what} {">=" if lo_in else ">"} {lo}'
  return what


def check_sampling_args(prefix: str = '', **values):
  """Validate sampling arguments by name (``SAMPLING_ARGS``: cfg, top_k, top_p, temperature, gumbel_temp,
  scale_pow, num_iter, infer_steps, batch_size, num_samples, num_per_class, grid_cols, seed, more_smooth, cfg_until,
  draft_scales) before
  any work: the one argument validator of the pipelines (``prefix=''``, the argument names) and the CLIs
  (``prefix='--'``, the flag names). NaN/inf, a non-integer where an integer is expected, or a value outside its
  range raises ``ValueError`` naming it, e.g. ``--cfg must be a finite number >= 0.0, got inf``."""
  for name, v in values.items():
    kind, lo, lo_in, hi, hi_in, none_ok = SAMPLING_ARGS[name]
    if v is None:
      if none_ok:
        continue
      ok = False
    else:
      a = np.asarray(v) if not isinstance(v, (str, bytes)) else np.asarray(None)
      dk = a.dtype.kind if a.ndim == 0 else ''          # scalars only: python, numpy or 0-d jax values
      ok = dk == 'b' if kind == 'bool' else dk in 'iu' if kind == 'int' else dk in 'iuf' and bool(np.isfinite(a))
    if ok and kind != 'bool':
      x = float(v) if kind == 'float' else int(v)
      ok = (lo is None or (x >= lo if lo_in else x > lo)) and (hi is None or (x <= hi if hi_in else x < hi))
    if not ok:
      raise ValueError(f'{prefix}{name} must be {_describe(kind, lo, lo_in, hi, hi_in)}, got {v!r}')


def parse_prune(value, what: str = 'prune'):
  """VAR token pruning ``{scale index: keep fraction}`` from a dict, (scale, fraction) pairs, or a string
  ``'7:0.5,8:0.25'`` (the CLI flag) -> sorted tuple of (int scale >= 1, float fraction in (0, 1]); None, ``''`` or
  ``{}`` -> () (off). Anything else raises ``ValueError`` naming ``what``."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return ()
  try:
    if isinstance(value, str):
      pairs = [tuple(p.split(':')) for p in value.replace(' ', '').split(',') if p]
      if any(len(p) != 2 for p in pairs):
        raise ValueError
      pairs = [(int(k, 10), float(f)) for k, f in pairs]
    else:
      items = value.items() if isinstance(value, dict) else value
      pairs = [(k, f) for k, f in items]
      if any(isinstance(k, bool) or int(k) != k for k, _ in pairs):
        raise ValueError
      pairs = [(int(k), float(f)) for k, f in pairs]
  except (TypeError, ValueError):
    raise ValueError(f'{what} must map scale indices to keep fractions, e.g. {{7: 0.5, 8: 0.25}} or '
                     f'"7:0.5,8:0.25", got {value!r}') from None
  seen = set()
  for k, f in pairs:
    if k in seen:
      raise ValueError(f'{what}: scale {k} given twice in {value!r}')
    seen.add(k)
    if k < 1:
      raise ValueError(f'{what}: scale index must be >= 1 (scale 0 is a single token), got {k} in {value!r}')
    if not (np.isfinite(f) and 0.0 < f <= 1.0):
      raise ValueError(f'{what}: keep fraction of scale {k} must be in (0, 1], got {f!r}')
  return tuple(sorted(pairs))


def parse_class_labels(values, num_classes: Optional[int] = None, what: str = '--classes'):
  """Class labels given as strings or ints (a CLI list) -> list of int. Each must be an integer; with
  ``num_classes``, in [0, num_classes], where ``num_classes`` itself is the unconditional (null) class that every
  family embeds (the same rule as the pipelines' ``labels``). An empty list is an error (leave the flag out to mean
  "all classes")."""
  values = list(values)
  if not values:
    raise ValueError(f'{what}: empty list of class labels (leave {what} out to sample every class)')
  out = []
  for v in values:
    s = str(v).strip()
    try:
      c = int(s, 10) if isinstance(v, str) else int(v)
      if not isinstance(v, str) and c != v:
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f'{what}: {s!r} is not an integer class label') from None
    if num_classes is not None and not 0 <= c <= num_classes:
      raise ValueError(f'{what}: class {c} is out of range for a model with {num_classes} classes (0..'
                       f'{num_classes - 1}, or {num_classes} = unconditional)')
    out.append(c)
  return out


def as_key(rng, what: str = 'rng'):
  """A PRNG key from a key or an int seed; None is an error naming ``what``."""
  if rng is None:
    raise ValueError(f'{what} must be a PRNG key or an int seed, got None')
  if isinstance(rng, (int, np.integer)):
    if not 0 <= int(rng) < 2 ** 32:     # jax.random.key keeps the low 32 bits: 2^32 + s would repeat seed s
      raise ValueError(f'{what}: int seed {int(rng)} is outside [0, 2^32) (PRNG seeds are 32 bits)')
    return jax.random.key(int(rng))
  return rng


def per_sample_keys(rng, num_samples: int, sample_ids=None) -> jax.Array:
  """(N,) keys ``fold_in(rng, i)`` for i = 0..N-1, or for the given global ``sample_ids`` (so a sample depends only
  on its own id: not on its batch, the batch size or the device count); rng a key or an int seed."""
  rng = as_key(rng)
  if sample_ids is None:
    ids = jnp.arange(num_samples, dtype=jnp.uint32)
  else:
    ids = jnp.asarray(sample_ids, jnp.uint32).reshape(-1)
    if ids.shape[0] != num_samples:
      raise ValueError(f'{ids.shape[0]} sample_ids for {num_samples} samples')
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)


def check_token_ids(tokens, vocab_size: int, what: str = 'tokens'):
  """The one token-id validator of the pipelines' inputs (VAR token maps, ELM sub-tokens, BAE bits with
  ``vocab_size=2``): every entry an integer in [0, vocab_size) — an integer or bool array, or a float array holding
  only such whole numbers (NaN, inf, 0.5 or an id out of range is a ValueError naming ``what``)."""
  t = np.asarray(tokens)
  if t.dtype.kind == 'f':
    if not np.all(np.isfinite(t)):
      raise ValueError(f'{what} hold {int(np.sum(~np.isfinite(t)))} NaN/inf values; expected integer ids in '
                       f'[0, {vocab_size})')
    if np.any(t != np.round(t)):
      raise ValueError(f'{what} must be integer ids in [0, {vocab_size}), got non-integer values ({t.dtype})')
  elif t.dtype.kind not in 'iub':
    raise ValueError(f'{what} must be integer ids in [0, {vocab_size}), got dtype {t.dtype}')
  if t.size and (t.min() < 0 or t.max() >= vocab_size):
    raise ValueError(f'{what} must lie in [0, {vocab_size}), got [{t.min():g}, {t.max():g}]')


def check_mask(mask, what: str = 'mask'):
  """A mask of 0/1 weights (e.g. ``edit``'s keep_mask): finite and within [0, 1] (ValueError naming ``what``)."""
  m = np.asarray(mask, np.float32)
  if not np.all(np.isfinite(m)):
    raise ValueError(f'{what} holds {int(np.sum(~np.isfinite(m)))} NaN/inf values; expected values in [0, 1]')
  if m.size and (m.min() < 0 or m.max() > 1):
    raise ValueError(f'{what} must be in [0, 1] (1 = keep), got min {m.min():g} max {m.max():g}')
  return m


def _label_array(labels) -> np.ndarray:
  """``labels`` as a 0-D or 1-D array; a 2-D (or deeper) array is an error, never flattened."""
  lab = np.asarray(labels)
  if lab.ndim > 1:
    raise ValueError(f'labels must be one int or a 1-D sequence of class labels, got an array of shape '
                     f'{lab.shape}')
  return lab


def resolve_labels(labels, rng, num_samples, num_classes: int) -> np.ndarray:
  """Class labels of a sampling call as int32 (num_classes = unconditional): ``labels`` as given (one label repeated
  ``num_samples`` times), or ``num_samples`` random classes drawn from ``rng`` when ``labels`` is None."""
  nc = num_classes
  if labels is None:
    if num_samples is None:
      raise ValueError('labels=None samples random classes: give num_samples too')
    return np.asarray(jax.random.randint(jax.random.fold_in(rng, 0x7fffffff), (num_samples,), 0, nc), np.int32)
  lab = _label_array(labels).reshape(-1)
  if num_samples is not None and lab.size == 1:
    lab = np.repeat(lab, num_samples)
  return _checked(lab, labels, nc)


def _checked(lab: np.ndarray, given, nc: int) -> np.ndarray:
  """``lab`` as int32 if it holds integers in [0, nc] (nc = unconditional), else an error showing ``given``."""
  if lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f'labels must be integers in [0, {nc}] ({nc} = unconditional), got {given!r}')
  if lab.min() < 0 or lab.max() > nc:
    raise ValueError(f'class label out of range: class labels must lie in [0, {nc}] ({nc} = unconditional), '
                     f'got min {lab.min()} max {lab.max()}')
  return lab.astype(np.int32)


def batch_labels(labels, batch: int, num_classes: int, default: Optional[int] = None) -> jax.Array:
  """Labels of an inference batch -> (B,) int32 in [0, num_classes]: (B,) per sample, one int for all, or None for
  ``default`` (when given)."""
  if labels is None and default is not None:
    return jnp.full((batch,), default, jnp.int32)
  lab = _label_array(labels)
  lab = np.broadcast_to(lab, (batch,)) if lab.ndim == 0 else lab
  if lab.shape != (batch,):
    raise ValueError(f'{lab.size} labels for a batch of {batch}')
  return jnp.asarray(_checked(lab, labels, num_classes))


def cast_floating(tree, dtype):
  """Cast the floating leaves of a param tree (once, outside the sampling loop)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def filter_top_k_top_p(logits, top_k: Optional[int] = 0, top_p: float = 0.0):
  """Mask logits to -inf outside the top-k and outside the top-p nucleus, with the reference's semantics.

  top-k keeps every logit >= the k-th largest (ties kept; k clipped to V; 0/None: off). top-p removes the tokens
  whose ascending cumulative probability is <= 1 - top_p, i.e. keeps a token iff the probability mass ranked above
  it is < top_p (so the largest is always kept). Implemented with one descending sort of the k (or V) largest values
  and a threshold compare — no argsort/scatter over the vocabulary. (Only exact float ties at the nucleus boundary
  can be decided differently from the reference's sort order, which is itself arbitrary there.)
  """
  top_k = int(top_k or 0)
  if top_k <= 0 and top_p <= 0:
    return logits
  v = logits.shape[-1]
  k = min(top_k, v) if top_k > 0 else v
  vals = jax.lax.top_k(logits, k)[0]                               # descending, (..., k)
  thresh = vals[..., -1:] if top_k > 0 else jnp.full_like(vals[..., :1], -jnp.inf)
  if top_p > 0:
    probs = jax.nn.softmax(vals.astype(jnp.float32), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs                     # mass ranked strictly above each value
    keep = above < top_p
    thresh = jnp.maximum(thresh, jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True))
  return jnp.where(logits < thresh, -jnp.inf, logits)
