"""Reliability of a run (issue 18): a diverging run stops, names the step and keeps its finite checkpoints and model;
data with more classes than the model is refused; one run per workdir (a stale lock is taken over); misleading
inputs (total_steps=0, a seed beyond 32 bits, another data.num_workers or batch size on resume, --checkpoint=<workdir>)
get messages that say what is wrong."""
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from var_jax.train import errors, nonfinite, workdir as workdir_lib

ARGS = ['--config=configs/quickstart.py', '--config.model.depth=2', '--config.model.embed_dim=64',
        '--config.model.num_heads=1', '--config.global_batch_size=16', '--config.total_steps=20',
        '--config.log_every=5', '--config.ckpt_every=10', '--config.eval_every=0', '--config.sample_every=0']
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
ENV.pop('XLA_FLAGS', None)


def _train(workdir, *extra, timeout=900):
  return subprocess.run([sys.executable, '-m', 'var_jax.train', f'--workdir={workdir}'] + ARGS + list(extra),
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _dead_pid():
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def _plant_lock(workdir, pid, host=None, proc_start=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), 'w') as f:
    json.dump({'host': host or socket.gethostname(), 'pid': pid, 'proc_start': proc_start,
               'started': '2026-01-01 00:00:00 UTC', 'argv': ['train', '--workdir=x']}, f)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """The tiny quickstart trained to step 20 (checkpoints 10, 20; model/ exported)."""
  wd = str(tmp_path_factory.mktemp('finished'))
  r = _train(wd)
  assert r.returncode == 0, r.stdout + r.stderr
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))     # released at exit
  return wd


# ----------------------------------------------------------------------------- 1. non-finite training
@pytest.mark.slow   # ~2 x 1-2 min on a loaded 2-core machine
def test_diverging_resume_stops_and_keeps_the_finite_checkpoints(finished, tmp_path):
  wd = str(tmp_path / 'wd')
  shutil.copytree(finished, wd)
  model_cfg = open(os.path.join(wd, 'model', 'config.json')).read()
  model_mtime = os.path.getmtime(os.path.join(wd, 'model'))
  _plant_lock(wd, _dead_pid())                                           # a killed earlier run: stale
  r = _train(wd, '--config.optim.base_lr=1e6', '--config.total_steps=60', '--config.keep_ckpts=2',
             '--config.resume_changes=optim.base_lr')                   # another lr: allowed (run identity)
  assert r.returncode == 1, r.stdout + r.stderr
  assert 'taking over the stale lock' in r.stdout
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith('error: non-finite ') and ' at step ' in err and "nonfinite='stop'" in err, err
  assert 'grad_norm' in err or 'loss' in err
  bad_step = int(err.split(' at step ')[1].split()[0])
  assert 20 < bad_step <= 60
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')))
  assert steps and steps[-1] >= 20 and all(s < bad_step for s in steps), steps
  assert f'the last checkpoint is {wd}/checkpoints/{steps[-1]}' in err
  # the kept checkpoints are finite and restorable; the exported model is the old one
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(wd, 'checkpoints', str(steps[-1]), 'state'))
  assert nonfinite.nonfinite_leaves(jax.tree.map(np.asarray, state)) == []
  assert open(os.path.join(wd, 'model', 'config.json')).read() == model_cfg
  assert os.path.getmtime(os.path.join(wd, 'model')) == model_mtime
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))     # released after the error


def _toy_step(state, batch, frozen):
  """A fake task step: params - lr * grad, the loss non-finite when the batch says so."""
  del frozen
  loss = jnp.where(batch['bad'], jnp.nan, jnp.sum(state.params['w'] ** 2))
  new = state.replace(step=state.step + 1, params={'w': state.params['w'] - 0.1},
                      opt_state={'count': state.opt_state['count'] + 1})
  return new, {'loss': loss, 'grad_norm': jnp.float32(1.0), 'acc': jnp.float32(jnp.nan), 'n': jnp.int32(3)}


def _toy_state():
  from var_jax.train.state import TrainState
  return TrainState(step=jnp.int32(0), params={'w': jnp.ones(3)}, opt_state={'count': jnp.int32(0)})


def test_guard_skip_drops_the_update_and_stop_applies_it():
  skip = jax.jit(nonfinite.guard(_toy_step, 'skip'))
  stop = jax.jit(nonfinite.guard(_toy_step, 'stop'))
  s0 = _toy_state()
  s1, m = skip(s0, {'bad': jnp.bool_(True)}, {})
  assert int(s1.step) == 1 and np.allclose(s1.params['w'], 1.0) and int(s1.opt_state['count']) == 0
  assert nonfinite.checked(m) == ['grad_norm', 'loss'] and m[nonfinite.KEY].tolist() == [False, True]   # not 'acc'
  s2, m = skip(s1, {'bad': jnp.bool_(False)}, {})
  assert int(s2.step) == 2 and np.allclose(s2.params['w'], 0.9) and not m[nonfinite.KEY].any()
  s3, m = stop(_toy_state(), {'bad': jnp.bool_(True)}, {})
  assert np.allclose(s3.params['w'], 0.9) and m[nonfinite.KEY].tolist() == [False, True]
  # the loop's side: flags read only at check(), the first bad step named
  w = nonfinite.Watch('stop')
  for step, bad in ((1, False), (2, True), (3, True)):
    _, m = stop(_toy_state(), {'bad': jnp.bool_(bad)}, {})
    assert nonfinite.KEY not in w.add(step, m)
  assert w.check() == [(2, ['loss']), (3, ['loss'])] and w.check() == []
  # dynamic loss scaling: the scaler owns non-finite gradients
  assert nonfinite.checked({'loss': jnp.float32(1), 'grad_norm': jnp.float32(1), 'loss_scale': jnp.float32(2)}) == \
      ['loss']
  with pytest.raises(errors.ConfigError, match='nonfinite'):
    nonfinite.Watch('ignore')


def test_nonfinite_leaves_names_the_leaf():
  tree = {'a': np.ones(2, np.float32), 'b': {'c': np.array([1.0, np.inf])}, 'i': np.arange(3)}
  assert nonfinite.nonfinite_leaves(tree) == ['b.c']
  assert nonfinite.nonfinite_leaves(jax.tree.map(jnp.asarray, tree)) == ['b.c']


# ----------------------------------------------------------------------------- 2. class count
def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


def _class_folder(root, n_classes):
  for split in ('train', 'val'):
    for c in range(n_classes):
      d = root / split / f'class_{c:02d}'
      d.mkdir(parents=True)
      for i in range(2):
        (d / f'{i}.png').write_bytes(_png(np.full((8, 8, 3), 10 * c + i, np.uint8)))


def test_more_data_classes_than_the_model_is_refused(tmp_path):
  _class_folder(tmp_path / 'data', 12)
  r = _train(tmp_path / 'wd', '--config.data.name=folder', f'--config.data.path={tmp_path / "data"}',
             '--config.data.num_workers=0', '--config.model.num_classes=10')
  assert r.returncode == 1, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith('error: the data has 12 classes') and 'model.num_classes=10' in err, err
  assert not os.path.exists(tmp_path / 'wd' / workdir_lib.LOCK_FILE)


def test_labels_are_checked_per_batch():
  from var_jax.train import loop
  loop.check_labels(np.array([0, 9]), 10, 3)
  loop.check_labels(np.array([0, 12]), None, 3)            # a tokenizer: no classes
  with pytest.raises(errors.DataMismatchError, match=r'step 3: the batch has label 10 outside \[0, 10\)'):
    loop.check_labels(np.array([0, 10]), 10, 3)
  with pytest.raises(errors.DataMismatchError, match='label -1'):
    loop.check_labels(np.array([-1, 0]), 10, 3)


# ----------------------------------------------------------------------------- 3. one run per workdir
def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, caplog):
  first = workdir_lib.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(errors.WorkdirLockedError, match=f'in use by another run: pid {os.getpid()} on host '):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  _plant_lock(str(tmp_path), _dead_pid())
  with caplog.at_level(logging.WARNING, logger='var_jax.train'):
    second = workdir_lib.WorkdirLock(str(tmp_path))
    second.acquire()
  assert 'taking over the stale lock' in caplog.text
  assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())['pid'] == os.getpid()
  second.release()
  # a reused pid (alive, another start time) is stale too; another host's lock never is
  _plant_lock(str(tmp_path), os.getpid(), proc_start='1')
  third = workdir_lib.WorkdirLock(str(tmp_path))
  third.acquire()
  third.release()
  _plant_lock(str(tmp_path), _dead_pid(), host='some-other-host')
  with pytest.raises(errors.WorkdirLockedError, match='some-other-host'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_cli_refuses_a_locked_workdir(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
  try:
    _plant_lock(str(tmp_path), holder.pid, proc_start=workdir_lib._proc_start(holder.pid))
    r = _train(tmp_path)
  finally:
    holder.kill()
    holder.wait()
  assert r.returncode == 1, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()[-1]
  assert err.startswith(f'error: {tmp_path} is in use by another run: pid {holder.pid}'), err
  assert os.path.exists(tmp_path / workdir_lib.LOCK_FILE)                # the holder's lock is left alone
  assert not os.path.exists(tmp_path / 'checkpoints')


# ----------------------------------------------------------------------------- 5. messages
def test_cli_config_errors(tmp_path):
  r = _train(tmp_path / 'a', '--config.total_steps=0')
  assert r.returncode == 1 and 'error: config.total_steps=0: give -1' in r.stderr, r.stderr
  r = _train(tmp_path / 'b', f'--config.seed={2 ** 32 + 1}')
  assert r.returncode == 1 and 'outside [0, 2^32)' in r.stderr, r.stderr


def test_sampling_seed_beyond_32_bits_is_refused():
  from var_jax.sampling.common import as_key
  assert as_key(2 ** 32 - 1) is not None
  with pytest.raises(ValueError, match=r'outside \[0, 2\^32\)'):
    as_key(2 ** 32)


@pytest.mark.slow
def test_resume_with_other_num_workers_or_batch_size(finished, tmp_path, caplog):
  r = _train(finished, '--config.data.num_workers=2', '--config.total_steps=30')
  assert r.returncode == 1, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()[-1]
  assert 'saved with data.num_workers=0, this run has data.num_workers=2' in err and \
      '--config.data.num_workers=0' in err, err
  from var_jax import checkpoint
  from var_jax.train import loop
  import ml_collections
  ckpt = checkpoint.TrainCheckpointer(os.path.join(finished, 'checkpoints'), 10, 3)
  cfg = ml_collections.ConfigDict({'global_batch_size': 32, 'data': {'num_workers': 0}})
  with caplog.at_level(logging.WARNING, logger='var_jax.train'):
    loop.check_resume_config(ckpt, 20, cfg, 'ckpts')
  ckpt.close()
  assert 'global_batch_size was 16 when ckpts/20 was saved, now 32: the schedule changes' in caplog.text
  # the run's identity (issue 24): another learning rate or data size is another run, refused in one line before
  # any work, naming each change and the flag that allows it
  r = _train(finished, '--config.optim.base_lr=1e-3', '--config.model.drop_path_rate=0.1', '--config.total_steps=30')
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stdout + r.stderr
  err = r.stderr.strip().splitlines()[-1]
  assert err == (f'error: {finished}/checkpoints/20 is another run: model.drop_path_rate: 0.0 -> 0.1; optim.base_lr: '
                 f'0.008 -> 0.001. A rerun resumes only the same run: use another --workdir, or allow these changes '
                 f'with --config.resume_changes=model.drop_path_rate,optim.base_lr'), err
  assert sorted(os.listdir(os.path.join(finished, 'checkpoints'))) == ['10', '20']


@pytest.mark.slow
def test_checkpoint_flag_accepts_a_training_workdir(finished, tmp_path):
  from var_jax import checkpoint
  from var_jax.pipelines import pretrained
  pipe = pretrained.load_pipeline(checkpoint=finished)
  assert pipe.var_config.depth == 2
  os.makedirs(tmp_path / 'checkpoints')
  with pytest.raises(FileNotFoundError, match='training workdir without an exported model'):
    checkpoint.load_model(str(tmp_path))


@pytest.mark.slow
def test_nonfinite_skip_drops_the_steps_and_finishes(finished, tmp_path):
  wd = str(tmp_path / 'wd')
  shutil.copytree(finished, wd)
  r = _train(wd, '--config.optim.base_lr=1e6', '--config.total_steps=30', '--config.nonfinite=skip',
             '--config.resume_changes=optim.base_lr')
  assert r.returncode == 0, r.stdout + r.stderr
  assert 'with non-finite metrics (first: step ' in r.stdout
  recs = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert recs[-1]['step'] == 30 and recs[-1]['skipped_steps'] > 0
  from var_jax import checkpoint
  _, _, vae, var = checkpoint.load_model(os.path.join(wd, 'model'))
  assert nonfinite.nonfinite_leaves({'vae': vae, 'var': var}) == []
