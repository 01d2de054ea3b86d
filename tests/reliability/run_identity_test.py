"""A run's identity (issue 24, ``var_jax.train.identity``): a rerun resumes a workdir's checkpoint only when its
config and frozen inputs (weights files by sha256, the data's size and classes, the token cache's manifest) are the
checkpoint's; any other change is one ``ResumeError`` line naming ``key: old -> new``, unless ``resume_safe`` (the
configs' default list) or the user's ``resume_changes`` allows it. Driven through ``restore_or_init`` on a toy state
(no compile); the end-to-end CLI refusal is in tests/train/run_reliability_test.py (slow)."""
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import pytest

from tests_helpers import load_config
from var_jax import checkpoint
from var_jax.train import errors, identity, loop
from var_jax.train.state import TrainState


def _state(step):
  return TrainState(step=jnp.int32(step), params={'w': jnp.full((4,), step, jnp.float32)}, opt_state={})


def _abstract():
  a = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  return a, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), a)


def _iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset().batch(4))


class _Source:
  def __init__(self, n=100, classes=10):
    self.n, self.num_classes = n, classes

  def __len__(self):
    return self.n


def _config(tmp_path, **kw):
  c = load_config('quickstart')          # the real key set, resume_safe included
  c.global_batch_size = 4
  c.vae_ckpt = str(tmp_path / 'vae_a.safetensors')
  for k, v in kw.items():
    parent = c
    *path, last = k.split('.')
    for p in path:
      parent = parent[p]
    parent[last] = v
  return c


@pytest.fixture
def run(tmp_path):
  """Checkpoints 1, 2 of a toy state saved by a run of ``_config`` (its vae_ckpt: vae_a, 64 bytes of 1s)."""
  (tmp_path / 'vae_a.safetensors').write_bytes(b'\1' * 64)
  (tmp_path / 'vae_b.safetensors').write_bytes(b'\2' * 64)       # same size (same shapes), other weights
  c = _config(tmp_path)
  ids = identity.RunIdentity(c, ('vae_ckpt',), _Source())
  d = tmp_path / 'checkpoints'
  ck = checkpoint.TrainCheckpointer(str(d), 1, 5)
  it = _iter()
  for s in (1, 2):
    next(it)
    ck.maybe_save(s, _state(s), it, c, inputs=ids.inputs())
  ck.wait()
  ck.close()
  return tmp_path


def _resume(run, config, source=None):
  ck = checkpoint.TrainCheckpointer(str(run / 'checkpoints'), 1, 5)
  try:
    abstract, shardings = _abstract()
    ids = identity.RunIdentity(config, ('vae_ckpt',), source or _Source())
    state, resumed = loop.restore_or_init(ck, abstract, shardings, _iter(), lambda: None, str(run / 'checkpoints'),
                                          config, ids)
    return int(state.step), ids
  finally:
    ck.close()


def test_an_unchanged_rerun_resumes(run):
  assert _resume(run, _config(run))[0] == 2


def test_another_tokenizer_file_with_the_same_shapes_is_refused_naming_it(run):
  c = _config(run, vae_ckpt=str(run / 'vae_b.safetensors'))
  before = sorted(os.listdir(run / 'checkpoints'))
  with pytest.raises(errors.ResumeError) as e:
    _resume(run, c)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f'{run}/checkpoints/2 is another run: vae_ckpt: {run}/vae_a.safetensors (sha256 ') and \
      f'-> {run}/vae_b.safetensors (sha256 ' in msg, msg
  assert msg.endswith('allow these changes with --config.resume_changes=vae_ckpt'), msg
  assert sorted(os.listdir(run / 'checkpoints')) == before
  # the same file, rewritten in place with other weights (same path, size): refused too
  shutil.copy(run / 'vae_b.safetensors', run / 'vae_a.safetensors')
  with pytest.raises(errors.ResumeError, match='vae_ckpt: '):
    _resume(run, _config(run))
  # ... unless the user allows it
  assert _resume(run, _config(run, resume_changes='vae_ckpt'))[0] == 2


def test_a_moved_identical_file_resumes(run):
  shutil.copy(run / 'vae_a.safetensors', run / 'moved.safetensors')
  assert _resume(run, _config(run, vae_ckpt=str(run / 'moved.safetensors')))[0] == 2


# key, new value: changes of what the run learns (refused by default, allowed by resume_changes=<key>)
CHANGES = [('optim.base_lr', 1e-3), ('seed', 7), ('model.drop_path_rate', 0.2), ('label_smoothing', 0.1),
           ('dtype', 'bfloat16'), ('data.hflip', True), ('data.path', '/elsewhere'), ('optim.schedule', 'cos'),
           ('ema.decay', 0.5)]


@pytest.mark.parametrize('key,value', CHANGES, ids=[k for k, _ in CHANGES])
def test_a_changed_setting_is_refused_naming_it_unless_allowed(run, key, value):
  c = _config(run, **{key: value})
  with pytest.raises(errors.ResumeError) as e:
    _resume(run, c)
  old = _config(run)
  for p in key.split('.'):
    old = old[p]
  msg = str(e.value)
  assert f' is another run: {key}: ' in msg and f'--config.resume_changes={key}' in msg and '\n' not in msg, msg
  assert _resume(run, _config(run, resume_changes=key, **{key: value}))[0] == 2
  assert _resume(run, _config(run, resume_changes=key.split('.')[0], **{key: value}))[0] == 2   # a sub-tree


def _safe_keys():
  return [k for k in load_config('quickstart').resume_safe.split(',')]


def test_the_safe_keys_are_config_keys():
  """Every entry of resume_safe names a key of some training config (a typo would allow nothing)."""
  keys = set()
  from tests_helpers import load_config as lc
  for name in ('quickstart', 'vqvae_quickstart', 'elm_quickstart', 'bigr_quickstart', 'bae_quickstart'):
    keys |= {k for k in identity.flatten(lc(name).to_dict())}
  for k in _safe_keys():
    assert any(x == k or x.startswith(k + '.') for x in keys), k


SAFE_CHANGES = {'total_steps': 99, 'epochs': 3.0, 'log_every': 7, 'ckpt_every': 9, 'keep_ckpts': 1, 'eval_every': 0,
                'sample_every': 0, 'global_batch_size': 8, 'data.num_workers': 0, 'mesh.data': 2,
                'nonfinite': 'skip', 'sample.cfg': 3.0}


def test_safe_changes_resume(run):
  c = _config(run, **SAFE_CHANGES)
  assert _resume(run, c)[0] == 2


def test_data_size_or_classes_changed_is_refused(run):
  with pytest.raises(errors.ResumeError, match=r'is another run: data: train_examples 100, num_classes 10 -> '
                                               r'train_examples 923, num_classes 10'):
    _resume(run, _config(run), _Source(923))
  assert _resume(run, _config(run, resume_changes='data'), _Source(923))[0] == 2


@pytest.mark.parametrize('family,key', [('var', 'vae_ckpt'), ('elm', 'bae_ckpt'), ('bigr', 'bae_ckpt')])
def test_a_stage_after_a_retrained_stage_may_resume_on_its_new_export(family, key):
  """The stage runner allows (with a warning) exactly the keys that name the retrained stage's directory."""
  import importlib.util
  from tests_helpers import REPO
  from var_jax.train import stages
  spec = importlib.util.spec_from_file_location('cfg_digits', REPO / 'configs' / 'digits.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(family)
  assert stages.referenced_keys(c.stages[family], ['tokenizer']) == [key]
  assert stages.referenced_keys(c.stages[family], []) == []
