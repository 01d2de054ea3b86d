"""Run directories that went wrong (issue 15): a damaged latest checkpoint falls back to the newest intact step (one
warning naming what was skipped and why; the damaged step is set aside, and that step number can be saved again);
no intact step is one error that changes nothing; an unwritable workdir is refused before training; a save failing
on a full disk is one error and keeps the earlier checkpoints; stale unfinished saves, a garbage lock file and a
checkpoint of another task are handled; a run resumes on another device / process count (the arrays re-sharded by
orbax, the data position re-split) with the losses of an uninterrupted run.

The fast tests drive ``TrainCheckpointer`` / ``restore_or_init`` on a toy state; the end-to-end CLI runs are slow."""
import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from tests_helpers import free_port, process_env
from var_jax import checkpoint
from var_jax.train import errors, loop, workdir as workdir_lib
from var_jax.train.state import TrainState

SHAPE = (128, 256)     # big enough that the array data lives in its own file (not inlined in the ocdbt manifest)


def _config(task='var'):
  return ml_collections.ConfigDict({'task': task, 'global_batch_size': 4, 'data': {'num_workers': 0}})


def _w(step):
  return jnp.arange(np.prod(SHAPE), dtype=jnp.float32).reshape(SHAPE) * step


def _state(step):
  return TrainState(step=jnp.int32(step), params={'w': _w(step)},
                    opt_state={'m': jnp.arange(3, dtype=jnp.float32) * step})


def _abstract():
  a = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  return a, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), a)


def _iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset().batch(4))


def _save(directory, steps, keep=5, config=None):
  ck = checkpoint.TrainCheckpointer(str(directory), 1, keep)
  it = _iter()
  for s in steps:
    next(it)
    ck.maybe_save(s, _state(s), it, config or _config())
  ck.wait()
  return ck


def _restore(directory, config=None):
  """-> (restored step, the data iterator's next batch, the checkpointer)."""
  ck = checkpoint.TrainCheckpointer(str(directory), 1, 5)
  it = _iter()
  abstract, shardings = _abstract()
  state, resumed = loop.restore_or_init(ck, abstract, shardings, it, lambda: None, str(directory), config or _config())
  assert resumed
  step = int(state.step)
  np.testing.assert_array_equal(np.asarray(state.params['w']), np.asarray(_w(step)))
  return step, next(it), ck


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Checkpoints 1, 2, 3 of the toy state (the data iterator one batch further at each)."""
  d = tmp_path_factory.mktemp('ckpts') / 'checkpoints'
  _save(d, (1, 2, 3)).close()
  return d


def _truncate(p):
  with open(p, 'r+b') as f:
    f.truncate(os.path.getsize(p) // 3)


def _array_file(d):
  return max(glob.glob(f'{d}/3/state/ocdbt.process_0/d/*'), key=os.path.getsize)


def _write(p, text):
  with open(p, 'w') as f:
    f.write(text)


DAMAGE = {
    # name: (damage(step_dir_parent), what the warning says)
    'empty_step_dir': (lambda d: (shutil.rmtree(d / '3'), os.makedirs(d / '3')), 'empty directory'),
    'no_step_metadata': (lambda d: os.remove(d / '3' / '_CHECKPOINT_METADATA'), '_CHECKPOINT_METADATA is missing'),
    'garbage_step_metadata': (lambda d: _write(d / '3' / '_CHECKPOINT_METADATA', '{x'),
                              '_CHECKPOINT_METADATA is not valid JSON'),
    'truncated_tree_metadata': (lambda d: _truncate(d / '3' / 'state' / '_METADATA'), 'state/_METADATA is not valid'),
    'no_state_item': (lambda d: shutil.rmtree(d / '3' / 'state'), 'state/_METADATA is missing'),
    'truncated_manifest': (lambda d: _truncate(d / '3' / 'state' / 'manifest.ocdbt'),
                           'its state metadata cannot be read (ValueError: DATA_LOSS'),
    'truncated_array_file': (lambda d: _truncate(_array_file(d)), 'its arrays cannot be read (ValueError: OUT_OF_RANGE'),
    'deleted_array_file': (lambda d: os.remove(_array_file(d)), 'its arrays cannot be read'),
    'garbage_array_file': (lambda d: _write(_array_file(d), 'x' * os.path.getsize(_array_file(d))),
                           'its arrays cannot be read'),
    'no_data_state': (lambda d: os.remove(d / '3' / 'data' / 'process_0-of-1.json'), 'data/ holds no data iterator'),
    'garbage_data_state': (lambda d: _write(d / '3' / 'data' / 'process_0-of-1.json', '{"next_'),
                           'data/process_0-of-1.json is not valid JSON'),
    'garbage_saved_config': (lambda d: _write(d / '3' / 'config' / 'metadata', 'nope'),
                             'config/metadata is not valid JSON'),
}


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(saved, tmp_path, kind, caplog):
  d = tmp_path / 'checkpoints'
  shutil.copytree(saved, d)
  damage, why = DAMAGE[kind]
  damage(d)
  with caplog.at_level(logging.WARNING, logger='var_jax'):
    step, batch, ck = _restore(d)
  assert step == 2 and batch.tolist() == [8, 9, 10, 11]          # step 2's state and data position
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == 'var_jax.train']
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f'skipped damaged checkpoint(s) {d}/3 (') and why in warnings[0], warnings[0]
  assert warnings[0].endswith('; resuming from step 2') and '\n' not in warnings[0]
  aside = [n for n in os.listdir(d) if n.startswith('3.damaged-')]
  assert len(aside) == 1 and f'moved to {d}/{aside[0]}' in warnings[0]       # kept, out of the way
  assert sorted(n for n in os.listdir(d) if n.isdigit()) == ['1', '2'] and ck.latest_step() == 2
  if kind not in ('empty_step_dir', 'truncated_array_file'):
    ck.close()
    return
  # the run saves step 3 again, and that checkpoint restores
  it = _iter()
  for _ in range(3):
    next(it)
  ck.maybe_save(3, _state(3), it, _config())
  ck.wait()
  ck.close()
  assert _restore(d)[0] == 3


def test_no_intact_checkpoint_is_one_error_and_changes_nothing(saved, tmp_path):
  d = tmp_path / 'checkpoints'
  shutil.copytree(saved, d)
  os.remove(d / '3' / 'state' / '_METADATA')
  _truncate(d / '2' / 'state' / 'manifest.ocdbt')
  shutil.rmtree(d / '1')
  os.makedirs(d / '1')
  before = sorted(os.listdir(d))
  with pytest.raises(errors.ResumeError) as e:
    _restore(d)
  msg = str(e.value)
  assert msg.startswith(f'no checkpoint in {d} can be restored: step 3: state/_METADATA is missing'), msg
  assert 'step 2: its state metadata cannot be read' in msg and 'step 1: empty directory' in msg
  assert msg.endswith(f'Nothing was changed; to start this run afresh, move {d} away (or use another --workdir)')
  assert sorted(os.listdir(d)) == before


def test_a_checkpoint_of_another_task_is_refused(saved, tmp_path):
  with pytest.raises(errors.ResumeError, match=r"checkpoints/3 is a checkpoint of a config.task='var' run, this run "
                                               r"has config.task='tokenizer': use another --workdir"):
    _restore(saved, _config('tokenizer'))
  assert sorted(os.listdir(saved)) == ['1', '2', '3']


def test_stale_unfinished_save_is_removed_with_a_warning(saved, tmp_path, caplog):
  d = tmp_path / 'checkpoints'
  shutil.copytree(saved, d)
  shutil.copytree(d / '3', d / '4.orbax-checkpoint-tmp-1764700000')     # a run killed while saving step 4
  with caplog.at_level(logging.WARNING, logger='var_jax'):
    step, _, ck = _restore(d)
  ck.close()
  assert step == 3
  assert f'{d}: removing 1 unfinished checkpoint save(s) of an earlier run (killed while saving): ' \
         f'4.orbax-checkpoint-tmp-1764700000' in caplog.text
  assert sorted(os.listdir(d)) == ['1', '2', '3']


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize('where', ['data_item', 'commit'])
def test_a_save_failing_on_a_full_disk_is_one_error_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, where):
  """ENOSPC in the synchronous part of a save (the data item) or in its asynchronous end (the commit marker)."""
  d = tmp_path / 'checkpoints'
  ck = _save(d, (1, 2), keep=2)
  if where == 'data_item':
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, 'save', _enospc)
  else:
    from orbax.checkpoint._src.path import async_path
    real = async_path.write_text

    async def write_text(path, *args, **kwargs):
      if 'commit_success' in str(path) and '3.orbax-checkpoint-tmp' in str(path):
        _enospc()
      return await real(path, *args, **kwargs)
    monkeypatch.setattr(async_path, 'write_text', write_text)
  it = _iter()
  with pytest.raises(errors.WorkdirError) as e:
    ck.maybe_save(3, _state(3), it, _config())
    ck.wait()
  assert str(e.value) == (f'saving checkpoint 3 to {d} failed: OSError: [Errno 28] No space left on device; the '
                          f'last complete checkpoint is {d}/2 (untouched). Free space or fix the directory, then run '
                          f'again to resume')
  ck.close()
  monkeypatch.undo()
  assert sorted(n for n in os.listdir(d) if n.isdigit()) == ['1', '2']    # keep=2: nothing deleted for step 3
  assert _restore(d)[0] == 2


def test_an_unwritable_workdir_is_refused_before_training(tmp_path, monkeypatch):
  afile = tmp_path / 'a_file'
  afile.write_text('')
  with pytest.raises(errors.WorkdirError, match=f'--workdir: cannot create directory {afile}/wd: '):
    workdir_lib.check_writable(f'{afile}/wd')
  # a read-only filesystem (we run as root: chmod does not stop us, so the probe write fails instead)
  from var_jax import fileio
  real = fileio._probe

  def read_only(directory, what):
    if directory.endswith('/checkpoints'):
      raise fileio.OutputError(f'{what}: cannot write to directory {directory}: [Errno 30] Read-only file system')
    return real(directory, what)
  monkeypatch.setattr(fileio, '_probe', read_only)
  os.makedirs(tmp_path / 'wd' / 'checkpoints')
  lock = workdir_lib.WorkdirLock(str(tmp_path / 'wd'))
  with pytest.raises(errors.WorkdirError, match=r'--workdir \(its checkpoints\): cannot write to directory '
                                                f'{tmp_path}/wd/checkpoints: .Errno 30. Read-only file system'):
    workdir_lib.acquire_on_process_0(lock)
  assert not lock.held and not os.path.exists(tmp_path / 'wd' / workdir_lib.LOCK_FILE)


def test_a_garbage_lock_file_names_itself(tmp_path):
  (tmp_path / workdir_lib.LOCK_FILE).write_bytes(b'\x00garbage')
  with pytest.raises(errors.WorkdirLockedError, match=f'locked by {tmp_path}/lock.json, which is not a lock this code '
                                                      f'wrote .unreadable.; delete it if no run uses this workdir'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_data_states_are_re_split_for_another_process_count():
  resplit = checkpoint._resplit_data_states
  # 2 processes x 8 rows, 3 batches read = 48 examples of the global stream
  assert resplit([{'next_index': 24}, {'next_index': 24}], 1, 16, 'ck/3') == {'next_index': 48}
  assert resplit([{'next_index': 24}, {'next_index': 24}], 4, 16, 'ck/3') == {'next_index': 12}
  assert resplit([{'next_index': 48}], 2, 16, 'ck/3') == {'next_index': 24}
  with pytest.raises(errors.ResumeError, match=r'ck/3 was saved by 2 process\(es\), this run has 1: the processes '
                                               r'stood at different data positions \(\[24, 25\]'):
    resplit([{'next_index': 24}, {'next_index': 25}], 1, 16, 'ck/3')
  with pytest.raises(errors.ResumeError, match=r'per data worker \(data.num_workers > 0\) and cannot be re-split; '
                                               r'resume it with 2 process\(es\) \(JAX_NUM_PROCESSES=2'):
    resplit([{'workers_state': {}}, {'workers_state': {}}], 1, 16, 'ck/3')
  with pytest.raises(errors.ResumeError, match='48 examples read is not a whole number of global batches of 32'):
    resplit([{'next_index': 24}, {'next_index': 24}], 1, 32, 'ck/3')


# ----------------------------------------------------------------------------- end to end (the CLI)
ARGS = ['--config=configs/quickstart.py', '--config.model.depth=2', '--config.model.embed_dim=64',
        '--config.model.num_heads=1', '--config.global_batch_size=16', '--config.log_every=1',
        '--config.ckpt_every=3', '--config.eval_every=0', '--config.sample_every=0', '--config.mesh.data=-1']


def _cli(workdir, steps, devices=2, *extra, processes=1):
  # --config.x overrides must follow --config (absl's config flags)
  cmd = [sys.executable, '-m', 'var_jax.train', f'--workdir={workdir}'] + ARGS + [f'--config.total_steps={steps}'] + \
      list(extra)
  if processes == 1:
    return [subprocess.run(cmd, cwd=REPO, env=process_env(devices), capture_output=True, text=True, timeout=1200)]
  port = free_port()
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=process_env(devices, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                                            JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
           for i in range(processes)]
  out = []
  for p in procs:
    o, e = p.communicate(timeout=1200)
    out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
  return out


def _ok(runs):
  for r in runs:
    assert r.returncode == 0, '\n\n'.join(r.stdout + r.stderr for r in runs)
  return runs[0]


def _losses(workdir):
  """step -> train loss (the last record of a step wins)."""
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if r['split'] == 'train':
      out[r['step']] = r['train_loss']
  return out


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """Steps 1..6 uninterrupted, one process with 2 devices."""
  wd = tmp_path_factory.mktemp('straight')
  _ok(_cli(wd, 6))
  return wd


@pytest.mark.slow
def test_cli_resumes_past_a_damaged_latest_checkpoint(straight, tmp_path):
  wd = tmp_path / 'wd'
  shutil.copytree(straight, wd)
  os.remove(wd / 'checkpoints' / '6' / 'state' / '_METADATA')
  (wd / 'config.json').write_text('{"trunc')                 # the workdir's config copy, damaged too: rewritten
  r = _ok(_cli(wd, 6))
  assert json.loads((wd / 'config.json').read_text())['total_steps'] == 6
  assert f'skipped damaged checkpoint(s) {wd}/checkpoints/6 (state/_METADATA is missing' in r.stdout, r.stdout
  assert 'resuming from step 3' in r.stdout and 'resumed from step 3' in r.stdout
  assert _losses(wd) == _losses(straight)                    # steps 4..6 trained again, bitwise the same
  names = os.listdir(wd / 'checkpoints')
  assert {'3', '6'} <= set(names) and any(n.startswith('6.damaged-') for n in names), names


@pytest.mark.slow
def test_cli_unwritable_workdir_is_one_error(tmp_path):
  (tmp_path / 'f').write_text('')
  r = _cli(tmp_path / 'f' / 'wd', 6)[0]
  assert r.returncode == 1, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith(f'error: --workdir: cannot create directory {tmp_path}/f/wd: '), err
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_resume_on_another_device_count_matches_an_uninterrupted_run(straight, tmp_path):
  """1 process x 4 devices to step 3, then 1 process x 2 devices to step 6 (orbax re-shards the arrays)."""
  wd = tmp_path / 'wd'
  _ok(_cli(wd, 3, 4))
  r = _ok(_cli(wd, 6, 2))
  assert 'resumed from step 3' in r.stdout
  a, b = _losses(straight), _losses(wd)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)


@pytest.mark.slow
def test_resume_on_another_process_count_matches_an_uninterrupted_run(straight, tmp_path):
  """2 processes x 2 devices to step 3, then 1 process x 2 devices to step 6: the data position is re-split."""
  wd = tmp_path / 'wd'
  _ok(_cli(wd, 3, 2, processes=2))
  assert sorted(os.listdir(wd / 'checkpoints' / '3' / 'data')) == \
      ['commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  r = _ok(_cli(wd, 6, 2))
  assert 'was saved by 2 process(es), this run has 1: the data position (48 examples) is re-split' in r.stdout, \
      r.stdout
  a, b = _losses(straight), _losses(wd)
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_agree_on_the_fallback_step(straight, tmp_path):
  """2 processes x 2 devices to step 6, its array data truncated; the 2-process rerun falls back to step 3 on both
  processes (process 0 sets step 6 aside once) and trains 4..6 again."""
  wd = tmp_path / 'wd'
  _ok(_cli(wd, 6, 2, processes=2))
  victim = max(glob.glob(f'{wd}/checkpoints/6/state/ocdbt.process_*/d/*'), key=os.path.getsize)
  _truncate(victim)
  runs = _cli(wd, 6, 2, processes=2)
  _ok(runs)
  for r in runs:
    assert 'resumed from step 3' in r.stdout, r.stdout
  assert f'skipped damaged checkpoint(s) {wd}/checkpoints/6 (its arrays cannot be read' in runs[0].stdout
  names = os.listdir(wd / 'checkpoints')
  assert sorted(n for n in names if n.isdigit()) == ['3', '6'] and \
      len([n for n in names if n.startswith('6.damaged-')]) == 1, names
  a, b = _losses(straight), _losses(wd)
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
