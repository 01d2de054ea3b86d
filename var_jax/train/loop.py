"""The one training loop of every task (VAR, tokenizer VQVAE/BAE, ELM/BiGR on bits; ``var_jax.train.tasks``).

  mesh -> data -> task (models, frozen tokenizer, schedule, optimizer, abstract state + shardings) ->
  restore-or-init (shapes checked leaf by leaf; a fresh state is born sharded) -> jitted step ->
  log / eval / periodic outputs / checkpoint / preemption -> export

The same on every process count: each process feeds its slice of the global batch, metrics and files are written
by process 0, and the export gathers the (sharded) weights on every process before process 0 writes them once.
Randomness is a function of (seed, step) (``var_jax.train.rng``) and the data order of the seed and the iterator
state, so a run resumed from a checkpoint reproduces the losses of an uninterrupted one.
"""
from __future__ import annotations

import json
import logging as std_logging
import signal
import time
from typing import Any, Callable, Dict, Tuple

import jax
import numpy as np

from var_jax import sharding as shd
from var_jax.train import metrics as metrics_lib
from var_jax.train import rng as rng_lib

logging = std_logging.getLogger('var_jax.train')


def setup_mesh(config):
  """(mesh, logical rules) from ``config.mesh`` / ``config.logical_axis_rules``; checks the global batch."""
  rules = shd.rules_from_config(config.logical_axis_rules)
  mesh = shd.make_mesh(config.mesh.to_dict())
  shd.global_batch_size_ok(config.global_batch_size, mesh)
  accum = int(config.grad_accum)
  if config.global_batch_size % (jax.process_count() * accum):
    raise ValueError(f'global_batch_size {config.global_batch_size} must divide into {jax.process_count()} '
                     f'processes x {accum} micro-batches')
  logging.info('mesh %s on %d devices (%s)', dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind)
  return mesh, rules


# ----------------------------------------------------------------------------- restore
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


def restore_or_init(ckpt, abstract, shardings, data_iter, init: Callable[[], Any], where: str):
  """The latest checkpoint of the run (shapes checked leaf by leaf first), else ``init()``. -> (state, resumed)."""
  latest = ckpt.latest_step()
  if latest is None:
    return init(), False
  check_restorable(abstract, ckpt.state_metadata(latest), f'{where}/{latest}')
  state = ckpt.restore(latest, abstract, shardings, data_iter)
  logging.info('resumed from step %d', latest)
  return state, True


# ----------------------------------------------------------------------------- preemption
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

  def should_stop(self, ckpt, step: int) -> bool:
    return self.requested if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def fmt_eta(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s'


# ----------------------------------------------------------------------------- eval and gathering
def evaluate(task, state) -> Dict[str, float]:
  """The task's eval step over the eval split (or ``config.eval_batches`` batches), every process on its slice:
  the step returns ``{name: (sum, count)}`` over the real (unpadded) examples; the result is sum / count per name
  plus ``examples`` (the ``'examples'`` entry's sum)."""
  from var_jax.data import pipeline as data_lib
  config = task.config
  per_process = config.global_batch_size // jax.process_count()
  ds = data_lib.make_eval_dataset(config.data, per_process, jax.process_index(), jax.process_count())
  eval_fn = task.jit_eval()
  tot: Dict[str, np.ndarray] = {}
  for i, batch in enumerate(ds):
    if 0 <= config.eval_batches <= i:
      break
    out = jax.device_get(eval_fn(state.params, shd.host_local_to_global(batch, task.mesh), task.frozen,
                                 rng_lib.eval_key(config.seed, i)))
    for k, (s, n) in out.items():
      a = np.asarray([s, n], np.float64)
      tot[k] = tot[k] + a if k in tot else a
  if not tot or tot['examples'][0] == 0:
    return {}
  out = {k: float(s / max(n, 1e-12)) for k, (s, n) in tot.items() if k != 'examples'}
  out['examples'] = float(tot['examples'][0])
  return out


def scalar_metrics(m: Dict[str, Any], vector_metrics: Dict[str, str]) -> Dict[str, float]:
  """Host metrics -> flat floats: scalars as they are, the task's vector metrics as ``fmt.format(i)`` each."""
  out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  for name, fmt in vector_metrics.items():
    for i, v in enumerate(np.asarray(m[name]).reshape(-1)):
      out[fmt.format(i)] = float(v)
  return out


def _write_json(workdir: str, name: str, obj):
  from etils import epath
  d = epath.Path(workdir)
  d.mkdir(parents=True, exist_ok=True)
  tmp = d / (name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.rename(d / name)


# ----------------------------------------------------------------------------- the loop
def train(config, workdir: str) -> Tuple[Any, Dict[str, float]]:
  """Train the task ``config.task`` names in ``workdir`` (resumes automatically). -> (final state, last train
  metrics + ``wall_time_s``)."""
  from var_jax import checkpoint
  from var_jax.data import pipeline as data_lib
  from var_jax.train import tasks

  mesh, rules = setup_mesh(config)
  per_process = config.global_batch_size // jax.process_count()
  n_train = len(data_lib.make_source(config.data, config.data.train_split))
  task = tasks.build(config, mesh, n_train, rules)
  total = task.schedule.total_steps
  train_iter = iter(data_lib.make_train_dataset(config.data, per_process, config.seed, jax.process_index(),
                                                jax.process_count()))
  ckpt = checkpoint.TrainCheckpointer(f'{workdir}/checkpoints', config.ckpt_every, config.keep_ckpts)

  def fresh():
    state = task.init_state()
    if config.init_from:
      state = task.init_from(state, config.init_from)
    if jax.process_index() == 0:
      from etils import epath
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=1))
    return state

  state, _ = restore_or_init(ckpt, task.abstract, task.shardings, train_iter, fresh, f'{workdir}/checkpoints')
  logging.info('%s; %d steps (%d per epoch)', task.describe(state), total, task.schedule.steps_per_epoch)
  info = task.run_info(state)
  if info and jax.process_index() == 0:
    _write_json(workdir, 'run_info.json', info)   # what scaling-law fits read (var_jax.scaling)

  writer = metrics_lib.MetricWriter(metrics_lib.local_logdir(workdir))
  preempt = Preemption()
  periodic = task.has_periodic_output and config.sample_every > 0
  step = int(jax.device_get(state.step))
  t_last, since, last, t_start = time.time(), 0, {}, time.time()
  try:
    with shd.mesh_context(mesh, rules):
      while step < total:
        stage, extra = task.stage(step)
        batch = shd.host_local_to_global(next(train_iter), mesh)
        state, m = task.jit_step(stage)(state, batch, task.frozen, *extra)
        step += 1
        since += 1
        if step % config.log_every == 0 or step == total or step == 1:
          dt = (time.time() - t_last) / since
          last = scalar_metrics(jax.device_get(m), task.vector_metrics)
          last.update(task.step_metrics(step - 1, stage))
          ips = config.global_batch_size / dt
          last.update(step_time=dt, images_per_s=ips)
          if task.tokens_per_example:
            last['tokens_per_s'] = ips * task.tokens_per_example
          flops, peak = task.train_flops_per_example, metrics_lib.peak_flops_per_device()
          if flops and peak:
            last['mfu'] = flops * ips / (peak * jax.device_count())
          writer.write(step, last)
          logging.info('step %d/%d %s %.1f img/s ETA %s', step, total, task.log_line(last), ips,
                       fmt_eta((total - step) * dt))
          t_last, since = time.time(), 0
        if task.has_eval and config.eval_every > 0 and (step % config.eval_every == 0 or step == total):
          ev = evaluate(task, state)
          writer.write(step, ev, prefix='eval')
          logging.info('eval step %d: %s', step, ' '.join(f'{k} {v:.4f}' for k, v in ev.items()))
        if periodic and (step % config.sample_every == 0 or step == total):
          path = task.periodic_output(state, batch, step, workdir)
          if path:
            logging.info('wrote %s', path)
        stop = preempt.should_stop(ckpt, step)
        ckpt.maybe_save(step, state, train_iter, config, force=step == total or stop)
        if stop:
          ckpt.wait()
          logging.warning('preempted at step %d: checkpoint saved, exiting', step)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    preempt.restore()
  if step >= total:
    host = shd.to_host(task.export_tree(state))      # every process takes part; process 0 writes
    if jax.process_index() == 0:
      for path, what in task.export(host, workdir, step):
        logging.info('wrote %s (%s)', path, what)
  last['wall_time_s'] = time.time() - t_start
  return state, last
