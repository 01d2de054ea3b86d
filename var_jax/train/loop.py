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
from var_jax.train import errors
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
      raise errors.ResumeError(f'{what}: leaf {k} (shape {want[k]}) is missing from the checkpoint')
    if k not in want:
      raise errors.ResumeError(f'{what}: the checkpoint has leaf {k} (shape {have[k]}) that this config does not')
    if want[k] != have[k]:
      raise errors.ResumeError(f'{what}: leaf {k} has shape {have[k]} in the checkpoint but {want[k]} in this config')


def _short(e: BaseException) -> str:
  """An exception as one short line: its root cause, without tensorstore's long JSON spec."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).split(' [tensorstore_spec', 1)[0].split(' See full TensorStore details', 1)[0]
  text = text.splitlines()[0] if text else ''
  return f'{type(e).__name__}: {text[:300]}'


def restore_or_init(ckpt, abstract, shardings, data_iter, init: Callable[[], Any], where: str, config=None,
                    identity=None):
  """The newest intact checkpoint of the run, else ``init()`` when there is none. -> (state, resumed).

  A damaged step (``ckpt.damage``, unreadable metadata or array data) is skipped for the next older one; once one
  restores, the skipped ones are set aside (``<step>.damaged-<time>``) with one warning naming each and why. When no
  step restores, nothing is changed and a ``ResumeError`` lists them. Every process takes the same decision (the
  structure is read from the shared files, and a restore counts only when it worked on every process). A step that
  does not fit ``config`` (``check_resume_config``, shapes leaf by leaf) or is another run (``identity``: a
  ``var_jax.train.identity.RunIdentity``, checked after the shapes) is an error, not damage."""
  steps = ckpt.all_steps()
  if not steps:
    return init(), False
  skipped = []
  for step in steps:
    why = ckpt.damage(step)
    saved = None
    if why is None:
      if config is not None:
        saved = check_resume_config(ckpt, step, config, where)
      try:
        metadata = ckpt.state_metadata(step)
      except (ValueError, OSError, KeyError) as e:
        why = f'its state metadata cannot be read ({_short(e)})'
    if why is None:
      check_restorable(abstract, metadata, f'{where}/{step}')
      if identity is not None and saved is not None:
        identity.check(saved, f'{where}/{step}')
      state = None
      try:
        state = ckpt.restore(step, abstract, shardings, data_iter,
                             None if config is None else config.global_batch_size)
      except errors.TrainingError:
        raise
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise plain Exception for unreadable array data
        why = f'its arrays cannot be read ({_short(e)})'
      from var_jax import checkpoint
      if not checkpoint.all_processes_agree(why is None):
        why = why or 'another process could not read it'
    if why is None:
      if skipped:
        moved = [(s, w, ckpt.set_aside(s)) for s, w in skipped]
        logging.warning('skipped damaged checkpoint(s) %s; resuming from step %d', '; '.join(
            f'{where}/{s} ({w}; moved to {m})' for s, w, m in moved), step)
      logging.info('resumed from step %d', step)
      return state, True
    skipped.append((step, why))
  raise errors.ResumeError(
      f'no checkpoint in {where} can be restored: ' + '; '.join(f'step {s}: {w}' for s, w in skipped) +
      f'. Nothing was changed; to start this run afresh, move {where} away (or use another --workdir)')


# ----------------------------------------------------------------------------- preemption
class Preemption:
  """Single host: a SIGTERM or SIGINT (Ctrl-C) handler sets a flag: the loop saves a checkpoint at the next step and
  exits cleanly (a second Ctrl-C exits at once, without saving). Multi-host: JAX's distributed runtime owns SIGTERM
  (its preemption notifier) and orbax's ``reached_preemption`` makes all hosts stop at the same step; Ctrl-C there
  stops without saving (one line, ``var_jax.cli``)."""

  def __init__(self):
    self.requested = False
    self._old = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    if signum == signal.SIGINT:
      if self.requested:
        raise KeyboardInterrupt
      logging.warning('Ctrl-C (SIGINT) received: saving a checkpoint and exiting (Ctrl-C again: exit without saving)')
    else:
      logging.warning('SIGTERM received: saving a checkpoint and exiting')
    self.requested = True

  def should_stop(self, ckpt, step: int) -> bool:
    return self.requested if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


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
  """``<workdir>/<name>``, replaced atomically (a resumed run rewrites its files); local or remote."""
  from var_jax import fileio
  fileio.makedirs(workdir)
  fileio.atomic_write_text(f'{workdir}/{name}', json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- checks
def model_num_classes(config):
  """The class count of a class-conditional model (``config.model.num_classes``), None for a tokenizer."""
  if 'model' in config and 'num_classes' in config.model:
    return int(config.model.num_classes)
  return None


def check_data_classes(source, num_classes, data_cfg):
  """The source's class count must not exceed the model's (labels index the class embedding)."""
  if num_classes is None:
    return
  have = int(source.num_classes)
  if have > num_classes:
    raise errors.DataMismatchError(
        f'the data has {have} classes ({source!r}, data.name={data_cfg.name!r}) but the model has '
        f'model.num_classes={num_classes}: set --config.model.num_classes={have} (or select fewer classes)')


def check_labels(labels, num_classes, step: int):
  """Host-side check of one batch's labels (cheap: min / max of a (b,) array)."""
  labels = np.asarray(labels)
  if num_classes is None or not labels.size:
    return
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise errors.DataMismatchError(f'step {step}: the batch has label {lo if lo < 0 else hi} outside [0, '
                                   f'{num_classes}) (model.num_classes={num_classes})')


def check_resume_config(ckpt, step: int, config, where: str):
  """What the saved config of checkpoint ``step`` says about resuming with ``config``: another
  ``data.num_workers`` is an error (the data iterator state is per worker), another ``global_batch_size`` a
  warning (the schedule changes). -> the saved config (a dict; None for a checkpoint without one)."""
  from etils import epath
  if not (epath.Path(ckpt.manager.directory) / str(step) / 'config').exists():
    return None
  saved = ckpt.saved_config(step)
  if 'task' in saved and 'task' in config and saved['task'] != config.task:
    raise errors.ResumeError(f'{where}/{step} is a checkpoint of a config.task={saved["task"]!r} run, this run has '
                             f'config.task={config.task!r}: use another --workdir for it')
  old_w, new_w = int(saved['data']['num_workers']), int(config.data.num_workers)
  if old_w != new_w:
    raise errors.ResumeError(f'{where}/{step} was saved with data.num_workers={old_w}, this run has '
                             f'data.num_workers={new_w}: the data iterator state is per worker and cannot be resumed '
                             f'with another count; resume with --config.data.num_workers={old_w}')
  old_b, new_b = int(saved['global_batch_size']), int(config.global_batch_size)
  if old_b != new_b:
    logging.warning('global_batch_size was %d when %s/%d was saved, now %d: the schedule changes (steps per epoch, '
                    'total steps when set by epochs, the learning rate when scaled by the batch, warmup)', old_b,
                    where, step, new_b)
  return saved


def _nonfinite_error(bad, step: int, ckpt, where: str):
  s, names = bad[0]
  latest = ckpt.latest_step()
  last = f'the last checkpoint is {where}/{latest}' if latest is not None else 'no checkpoint was saved'
  return errors.NonFiniteError(
      f'non-finite {", ".join(names)} at step {s} (config.nonfinite=\'stop\'); the run stopped at step {step} and '
      f'saved nothing after it; {last}. Resume with a lower learning rate, or --config.nonfinite=skip to skip such '
      f'steps')


def _check_finite(watch, step: int, ckpt, where: str):
  """Read the pending step flags (one host sync); 'stop': raise at the first flagged step, 'skip': log them."""
  bad = watch.check()
  if not bad:
    return
  if watch.mode == 'stop':
    raise _nonfinite_error(bad, step, ckpt, where)
  logging.warning('skipped %d step(s) with non-finite metrics (first: step %d, %s); %d skipped in all', len(bad),
                  bad[0][0], ', '.join(bad[0][1]), watch.skipped)


# ----------------------------------------------------------------------------- the loop
def train(config, workdir: str) -> Tuple[Any, Dict[str, float]]:
  """Train the task ``config.task`` names in ``workdir`` (resumes automatically), holding the workdir's lock
  (``var_jax.train.workdir``) for the whole run. -> (final state, last train metrics + ``wall_time_s``).

  Non-finite steps (``config.nonfinite``, ``var_jax.train.nonfinite``): 'stop' raises ``NonFiniteError`` naming
  the first step whose loss / grad norm was not finite (the step count after it, as logged) — found at the next log
  step, eval / output step, checkpoint save or export, whichever comes first — and saves nothing from then on; 'skip'
  drops those updates and counts them. A state is checked leaf by leaf before every save and the export.
  ``finished`` in the returned metrics is 1.0 when the run reached its last step (and exported), 0.0 when it stopped
  early (a preemption)."""
  from var_jax.train import reference_args
  from var_jax.train import workdir as workdir_lib
  config = reference_args.resolve(config)      # a reference train.py command line, if given, before anything reads it
  from var_jax.train import validate
  validate.validate(config)                    # the whole config, before any download, the lock, the workdir or data
  from var_jax import hub
  config = hub.resolve_config(config)          # released names in init_from / vae_ckpt / bae_ckpt -> hub cache files
  preempt = Preemption()           # from the start: a SIGTERM during set-up still releases the lock
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    workdir_lib.acquire_on_process_0(lock)
    setup = _setup(config)         # mesh, data, task, frozen inputs: set-up errors before anything is written
    return _train(config, workdir, preempt, *setup)
  finally:
    lock.release()
    preempt.restore()


def _setup(config):
  """What a run is built from, before anything is written: (mesh, rules, train source, class count, task) with
  the frozen inputs (tokenizer / LPIPS weights) loaded — a missing or empty data folder, a tokenizer of another
  family or size, a mesh that does not fit are set-up errors here."""
  from var_jax.data import pipeline as data_lib
  from var_jax.train import tasks
  mesh, rules = setup_mesh(config)
  source = data_lib.make_source(config.data, config.data.train_split)
  num_classes = model_num_classes(config)
  check_data_classes(source, num_classes, config.data)
  task = tasks.build(config, mesh, len(source), rules)
  task.frozen
  return mesh, rules, source, num_classes, task


def _train(config, workdir: str, preempt: Preemption, mesh, rules, source, num_classes, task
           ) -> Tuple[Any, Dict[str, float]]:
  from var_jax import checkpoint
  from var_jax.data import pipeline as data_lib
  from var_jax.train import nonfinite as nonfinite_lib

  watch = nonfinite_lib.Watch(config.nonfinite)
  per_process = config.global_batch_size // jax.process_count()
  from var_jax.train import identity as identity_lib
  run_id = identity_lib.RunIdentity(config, task.frozen_input_keys, source)
  total = task.schedule.total_steps
  train_iter = iter(data_lib.make_train_dataset(config.data, per_process, config.seed, jax.process_index(),
                                                jax.process_count()))
  where = f'{workdir}/checkpoints'
  ckpt = checkpoint.TrainCheckpointer(where, config.ckpt_every, config.keep_ckpts)
  rep = shd.replicated(mesh)

  def fresh():
    state = task.init_state()
    if config.init_from:
      state = task.init_from(state, config.init_from)
    return state

  def save(step, state, force=False):
    """Checkpoint ``step`` when due, after the pending flags and the state itself were found finite."""
    if not ckpt.due(step, force):
      return
    _check_finite(watch, step, ckpt, where)
    bad = nonfinite_lib.nonfinite_leaves(state, rep)
    if bad:
      raise errors.NonFiniteError(f'step {step}: the train state has non-finite values in {", ".join(bad[:5])}; '
                                  f'not saved (the last checkpoint is {where}/{ckpt.latest_step()})')
    ckpt.maybe_save(step, state, train_iter, config, force=force, inputs=run_id.inputs())
    return True

  try:
    state, _ = restore_or_init(ckpt, task.abstract, task.shardings, train_iter, fresh, where, config, run_id)
    run_id.inputs()                     # a fresh run: its inputs' fingerprints now, before the first step
    logging.info('%s; %d steps (%d per epoch)', task.describe(state), total, task.schedule.steps_per_epoch)
    info = task.run_info(state)
    if jax.process_index() == 0:        # this run's config (a resumed run replaces an earlier or damaged one)
      from var_jax import fileio
      fileio.atomic_write_text(f'{workdir}/config.json', config.to_json_best_effort(indent=1))
      if info:
        _write_json(workdir, 'run_info.json', info)   # what scaling-law fits read (var_jax.scaling)

    periodic = task.has_periodic_output and config.sample_every > 0
    step = int(jax.device_get(state.step))
    # a resumed run drops what an earlier one logged after this step (each step once in metrics.jsonl / TensorBoard)
    writer = metrics_lib.MetricWriter(workdir, start_step=step, vector_metrics=task.vector_metrics)
    writer.text(step, 'config', '```\n' + config.to_json_best_effort(indent=1) + '\n```')
    flops, peak = task.train_flops_per_example, metrics_lib.peak_flops_per_device()
    t_last, since, last, t_start = time.time(), 0, {}, time.time()
    from var_jax import work
    work.started()                       # from here, an unexpected exception keeps its traceback (var_jax.cli)
    try:
      with shd.mesh_context(mesh, rules):
        while step < total:
          stage, extra = task.stage(step)
          host_batch = next(train_iter)
          if num_classes is not None:
            check_labels(host_batch['label'], num_classes, step + 1)
          batch = shd.host_local_to_global(host_batch, mesh)
          step_fn = task.jit_step(stage, watch.mode)
          if peak and flops is None:    # no analytic count: XLA's, once (MFU is only reported where peak is known);
            # it counts a scanned loop's body once: one micro-batch of the gradient accumulation
            flops = (metrics_lib.compiled_flops(step_fn, state, batch, task.frozen, *extra) or 0.0) / \
                (config.global_batch_size // int(config.grad_accum))
          state, m = step_fn(state, batch, task.frozen, *extra)
          m = watch.add(step + 1, m)
          step += 1
          since += 1
          if step % config.log_every == 0 or step == total or step == 1:
            _check_finite(watch, step, ckpt, where)
            dt = (time.time() - t_last) / since
            last = scalar_metrics(jax.device_get(m), task.vector_metrics)
            last.update(task.step_metrics(step - 1, stage))
            ips = config.global_batch_size / dt
            last.update(step_time=dt, images_per_s=ips)
            if watch.mode == 'skip':
              last['skipped_steps'] = watch.skipped
            if task.tokens_per_example:
              last['tokens_per_s'] = ips * task.tokens_per_example
            if flops and peak:
              last['mfu'] = flops * ips / (peak * jax.device_count())
            writer.write(step, last)
            logging.info('step %d/%d %s %.1f img/s ETA %s', step, total, task.log_line(last), ips,
                         fmt_eta((total - step) * dt))
            t_last, since = time.time(), 0
          if task.has_eval and config.eval_every > 0 and (step % config.eval_every == 0 or step == total):
            _check_finite(watch, step, ckpt, where)
            ev = evaluate(task, state)
            writer.write(step, ev, prefix='eval')
            logging.info('eval step %d: %s', step, ' '.join(f'{k} {v:.4f}' for k, v in ev.items()))
          if periodic and (step % config.sample_every == 0 or step == total):
            _check_finite(watch, step, ckpt, where)
            out = task.periodic_output(state, batch, step, workdir)     # images / histograms (process 0)
            for path in out.files if out else ():
              logging.info('wrote %s', path)
            for split, values in (out.scalars if out else {}).items():
              logging.info('%s step %d: %s', split, step, task.scalars_line(split, values))
            writer.summaries(step, out)
          stop = preempt.should_stop(ckpt, step)
          if save(step, state, force=step == total or stop):
            writer.sync()         # a remote workdir gets metrics.jsonl and the event files with each checkpoint
          if stop:
            ckpt.wait()
            logging.warning('preempted at step %d: checkpoint saved, exiting', step)
            break
    finally:
      writer.close()
    if step >= total:
      _check_finite(watch, step, ckpt, where)
      host = shd.to_host(task.export_tree(state))      # every process takes part; process 0 writes
      bad = nonfinite_lib.nonfinite_leaves(host)
      if bad:
        raise errors.NonFiniteError(f'step {step}: the final state has non-finite values in {", ".join(bad[:5])}; '
                                    f'the model is not exported')
      if jax.process_index() == 0:
        for path, what in task.export(host, workdir, step):
          logging.info('wrote %s (%s)', path, what)
  finally:
    ckpt.wait()
    ckpt.close()
  last['wall_time_s'] = time.time() - t_start
  last['finished'] = float(step >= total)      # 0.0: stopped early (preempted); the export was not written
  return state, last
