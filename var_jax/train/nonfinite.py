"""Non-finite training steps: a flag vector computed inside the jitted step, read by the loop when it syncs anyway.

``guard(step_fn, mode)`` wraps a task's ``fn(state, batch, frozen, *extra) -> (state, metrics)`` and adds
``metrics[KEY]``: a bool vector, one entry per ``checked(metrics)`` name, True where that metric is not finite. The
checked metrics are the floating ones whose name holds 'loss' or 'grad_norm' (not 'loss_scale'); under dynamic loss
scaling (a 'loss_scale' metric) the gradient norms are left to the scaler, which skips overflowing steps itself.
The metrics are replicated (the step's out_shardings), so every process reads the same flags.

``config.nonfinite``:
  'stop'  the update is applied as usual; the loop stops the run at its next check (a log step, an eval or output
          step, before every checkpoint save and before the export) naming the first flagged step, and saves nothing.
  'skip'  a flagged step keeps the state it was given (params, optimizer state, EMA, aux); only ``step`` advances
          (its batch is consumed). The loop counts the skipped steps (metric ``skipped_steps``). The jitted step then
          holds the old and the new state at once (the select cannot update the donated buffers in place).
"""
from __future__ import annotations

from typing import Callable, List

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('stop', 'skip')
KEY = 'nonfinite'


def check_mode(mode: str) -> str:
  """``config.nonfinite``: 'stop' (raise at the first non-finite step) or 'skip' (drop those updates)."""
  if mode not in MODES:
    from var_jax.train.errors import ConfigError
    raise ConfigError(f"config.nonfinite must be one of {MODES}, got {mode!r}")
  return mode


def checked(metrics) -> List[str]:
  """The names (sorted) of the metrics the flag vector covers; the same on the host and in the trace."""
  scaled = 'loss_scale' in metrics
  out = []
  for k in sorted(metrics):
    if k in (KEY, 'loss_scale') or not jnp.issubdtype(metrics[k].dtype, jnp.floating):
      continue
    if 'loss' in k or ('grad_norm' in k and not scaled):
      out.append(k)
  return out


def guard(step_fn: Callable, mode: str) -> Callable:
  """``step_fn`` with ``metrics[KEY]`` added (and, for 'skip', flagged updates dropped); see the module doc."""
  check_mode(mode)

  def fn(state, batch, frozen, *extra):
    new, m = step_fn(state, batch, frozen, *extra)
    names = checked(m)
    flags = (jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(m[k]))) for k in names]) if names
             else jnp.zeros((0,), bool))
    if mode == 'skip' and names:
      bad = jnp.any(flags)
      new = jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, state).replace(step=new.step)
    return new, {**m, KEY: flags}

  return fn


def _floating(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def nonfinite_leaves(tree, replicated=None) -> List[str]:
  """Dotted paths of the floating leaves of ``tree`` holding a NaN / inf (device arrays: one jitted reduction whose
  result is ``replicated``; host arrays: numpy)."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _floating(x)]
  if not flat:
    return []
  xs = [x for _, x in flat]
  if all(isinstance(x, np.ndarray) or np.isscalar(x) for x in xs):
    ok = np.asarray([bool(np.all(np.isfinite(x))) for x in xs])
  else:
    fn = jax.jit(lambda t: jnp.stack([jnp.all(jnp.isfinite(x)) for x in t]), out_shardings=replicated)
    ok = np.asarray(jax.device_get(fn(xs)))
  return [jax.tree_util.keystr(flat[i][0], simple=True, separator='.') for i in np.flatnonzero(~ok)]


class Watch:
  """The loop's side: the flag vectors of the steps since the last check (device arrays: nothing syncs until
  ``check``), the skipped-step count."""

  def __init__(self, mode: str):
    self.mode = check_mode(mode)
    self.pending = []          # [(step, flags)]
    self.names: List[str] = []
    self.skipped = 0

  def add(self, step: int, metrics) -> dict:
    """Take the flags out of the step's ``metrics`` (returned without them)."""
    m = dict(metrics)
    flags = m.pop(KEY)
    if not self.names:
      self.names = checked(m)
    self.pending.append((step, flags))
    return m

  def check(self) -> List[tuple]:
    """-> [(step, [flagged metric names])] of the pending steps (and forget them); 'skip' counts them."""
    if not self.pending:
      return []
    rows = np.asarray(jax.device_get([f for _, f in self.pending])).reshape(len(self.pending), -1)
    bad = [(s, [self.names[i] for i in np.flatnonzero(r)]) for (s, _), r in zip(self.pending, rows) if r.any()]
    self.pending = []
    if self.mode == 'skip':
      self.skipped += len(bad)
    return bad
