"""Pieces both training loops (VAR, tokenizer) share: mesh setup, restore-or-init, preemption, image output."""
from __future__ import annotations

import io
import logging as std_logging
import signal
from typing import Any, Callable, Optional

import jax

from var_jax import sharding as shd

logging = std_logging.getLogger('var_jax.train')


def setup_mesh(config):
  """(mesh, logical rules) from ``config.mesh`` / ``config.logical_axis_rules``; checks the global batch."""
  rules = shd.rules_from_config(config.logical_axis_rules)
  mesh = shd.make_mesh(config.mesh.to_dict())
  shd.global_batch_size_ok(config.global_batch_size, mesh)
  accum = int(config.get('grad_accum', 1))
  if config.global_batch_size % (jax.process_count() * accum):
    raise ValueError(f'global_batch_size {config.global_batch_size} must divide into {jax.process_count()} '
                     f'processes x {accum} micro-batches')
  logging.info('mesh %s on %d devices (%s)', dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind)
  return mesh, rules


def restore_or_init(ckpt, abstract, shardings, data_iter, init: Callable[[], Any], where: str):
  """The latest checkpoint of the run (shapes checked leaf by leaf first), else ``init()``. -> (state, resumed)."""
  latest = ckpt.latest_step()
  if latest is None:
    return init(), False
  check_restorable(abstract, ckpt.state_metadata(latest), f'{where}/{latest}')
  state = ckpt.restore(latest, abstract, shardings, data_iter)
  logging.info('resumed from step %d', latest)
  return state, True


def _dotted(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '.'.join(parts)


def check_restorable(abstract, metadata, what='checkpoint'):
  """Compare a checkpoint's stored shapes with the state the config builds; name the first mismatched leaf."""
  want = {_dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  have = {}
  for p, x in jax.tree_util.tree_flatten_with_path(metadata)[0]:
    have[getattr(x, 'name', None) or _dotted(p)] = tuple(getattr(x, 'shape', ()))
  for k in sorted(set(want) | set(have)):
    if k not in have:
      raise ValueError(f'{what}: leaf {k} (shape {want[k]}) is missing from the checkpoint')
    if k not in want:
      raise ValueError(f'{what}: the checkpoint has leaf {k} (shape {have[k]}) that this config does not')
    if want[k] != have[k]:
      raise ValueError(f'{what}: leaf {k} has shape {have[k]} in the checkpoint but {want[k]} in this config')


class Preemption:
  """Single host: a SIGTERM handler sets a flag. Multi-host: JAX's distributed runtime owns SIGTERM (its
  preemption notifier) and orbax's ``reached_preemption`` makes all hosts stop at the same step."""

  def __init__(self):
    self.requested = False
    self._old = None
    if jax.process_count() == 1:
      self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint and exiting')
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def should_stop(preempt: Preemption, ckpt, step: int) -> bool:
  """Single host: SIGTERM seen. Multi-host: orbax's preemption sync says every host stops at this step."""
  return preempt.requested if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)


def write_png(workdir: str, subdir: str, step: int, image) -> Optional[str]:
  """Save a PIL image as <workdir>/<subdir>/step_XXXXXXXX.png (local or gs://) from process 0; returns the path."""
  if jax.process_index() != 0:
    return None
  from etils import epath
  d = epath.Path(workdir) / subdir
  d.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  image.save(buf, 'PNG')
  path = d / f'step_{step:08d}.png'
  path.write_bytes(buf.getvalue())
  return str(path)


def fmt_eta(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s'
