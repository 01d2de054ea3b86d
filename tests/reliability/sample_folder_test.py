"""Issue 24, a sample folder's identity: ``--out_dir`` records its plan (``sample_plan.json``: the model's configs
and a fingerprint of its weights, every sampling setting, seed, dtype, labels); a rerun with the same plan resumes,
any other is refused naming the difference before any image is sampled (nothing changed), ``--overwrite`` starts
over (deleting only what sampling wrote), and PNGs outside the plan never go into ``samples.npz``."""
import logging
import os

import numpy as np
import pytest

from cli_cases import error_line, run_cli_cases
from var_jax.eval import protocol


class Pipe:
  """A VAR-like pipeline whose sample i is a fixed function of (weights, seed, i, cfg); no model."""
  family, num_classes, image_size = 'var', 10, 16

  def __init__(self, weights='w1'):
    self.weights, self.drawn = weights, []

  def identity(self):
    return {'family': self.family, 'weights': f'sha256:{self.weights}', 'var_config': {'depth': 2}}

  def sample(self, labels, seed, *, sample_ids, batch_size=None, dtype=None, cfg=1.5, **opts):
    self.drawn += list(sample_ids)
    ids = np.asarray(sample_ids, np.float32)[:, None, None, None]
    x = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(1, 16, 16, 3)
    return np.mod(x + ids * 0.137 + seed * 0.01 + cfg * 0.1 + len(self.weights) * 0.05, 1.0), None


def _gen(pipe, out_dir, classes=('1', '4'), num_per_class=2, seed=1, **kw):
  labels = protocol.sample_plan(10, list(classes), num_per_class)
  return protocol.generate_samples(pipe, str(out_dir), labels, seed=seed, batch_size=kw.pop('batch_size', 2),
                                   log=lambda s: None, **kw)


def _state(d):
  return {f: (os.path.getsize(d / f), os.path.getmtime(d / f)) for f in sorted(os.listdir(d))}


def test_same_plan_resumes(tmp_path):
  out = tmp_path / 's'
  _gen(Pipe(), out)
  assert sorted(os.listdir(out)) == sorted([protocol.image_name(i, l) for i, l in enumerate([1, 1, 4, 4])] +
                                           ['samples.npz', protocol.PLAN_FILE])
  os.remove(out / protocol.image_name(3, 4))
  pipe = Pipe()
  _gen(pipe, out, batch_size=3, cfg=1.5)    # another batch size, the default cfg given explicitly: the same plan
  assert pipe.drawn == [3]


@pytest.mark.parametrize('change,named', [
    ({'cfg': 4.0}, 'sampling.cfg: 1.5 -> 4.0'),
    ({'top_k': 5}, 'sampling.top_k: 900 -> 5'),
    ({'seed': 2}, 'seed: 1 -> 2'),
    ({'num_per_class': 3}, 'num_per_class: 2 -> 3'),
    ({'classes': ('1', '5')}, 'classes: 1,4 -> 1,5'),
    ({'dtype': 'bfloat16'}, 'dtype: float32 -> bfloat16'),
    ({'pipe': Pipe('w2')}, 'model.weights: sha256:w1 -> sha256:w2'),
    ({'top_p': 0.5}, 'sampling.top_p: 0.96 -> 0.5'),
])
def test_another_plan_is_refused_naming_the_difference(tmp_path, change, named):
  out = tmp_path / 's'
  _gen(Pipe(), out)
  before = _state(out)
  change = dict(change)
  pipe = change.pop('pipe', Pipe())
  with pytest.raises(ValueError) as e:
    _gen(pipe, out, **change)
  msg = str(e.value)
  assert named in msg and '--overwrite' in msg and len(msg.splitlines()) == 1, msg
  assert pipe.drawn == [] and _state(out) == before


def test_cli_flags_checked_against_the_plan_before_loading(tmp_path):
  """sample / evaluate: what the flags decide is compared before the model is loaded (the weights named do not
  exist, and the error is not about them); --overwrite deletes nothing until the new model is loaded."""
  out = tmp_path / 's'
  _gen(Pipe(), out)
  (tmp_path / 'e').mkdir()
  _gen(Pipe(), tmp_path / 'e' / 'samples', num_per_class=50)
  before, before_e = _state(out), _state(tmp_path / 'e' / 'samples')
  model = ['--vae_ckpt=/nonexistent/vae.pth', '--var_ckpt=/nonexistent/var.pth']
  cases = [
      (['var_jax.sample', f'--out_dir={out}', '--classes=1,4', '--num_per_class=2', '--seed=2'], 'seed: 1 -> 2'),
      (['var_jax.sample', f'--out_dir={out}', '--classes=1,4', '--num_per_class=3', '--seed=1'],
       'num_per_class: 2 -> 3'),
      (['var_jax.sample', f'--out_dir={out}', '--num_per_class=2', '--seed=1', '--cfg=3'], 'sampling.cfg: 1.5 -> 3.0'),
      (['var_jax.sample', f'--out_dir={out}', '--classes=1,4', '--num_per_class=2', '--seed=1',
        '--dtype=bfloat16'], 'dtype: float32 -> bfloat16'),
      (['var_jax.evaluate', f'--out_dir={tmp_path / "e"}', '--classes=1,4', '--top_k=3'],
       'sampling.top_k: 900 -> 3'),
      (['var_jax.sample', f'--out_dir={out}', '--seed=2', '--overwrite'], '/nonexistent/'),
  ]
  results = run_cli_cases([[c[0], *model, *c[1:]] for c, _ in cases], tmp_path)
  for (c, msg), r in zip(cases, results):
    line = error_line(r)
    assert msg in line, (c, line)
    assert msg == '/nonexistent/' or 'nonexistent' not in line, (c, line)
  assert _state(out) == before and _state(tmp_path / 'e' / 'samples') == before_e


def test_overwrite_starts_over_and_deletes_only_samples(tmp_path, caplog):
  out = tmp_path / 's'
  _gen(Pipe(), out, num_per_class=3)
  (out / 'notes.txt').write_text('mine')
  (out / '.000001_class0001.png.tmp-1-abcdef01').write_bytes(b'x')
  pipe = Pipe('w2')
  with caplog.at_level(logging.WARNING):
    npz = _gen(pipe, out, classes=('7',), num_per_class=1, seed=5, overwrite=True)
  assert 'deleted 8 files of the earlier samples' in caplog.text, caplog.text
  assert sorted(os.listdir(out)) == [protocol.image_name(0, 7), 'notes.txt', protocol.PLAN_FILE, 'samples.npz']
  assert pipe.drawn == [0] and np.load(npz)['arr_0'].shape == (1, 16, 16, 3)
  assert protocol.read_plan(str(out))['seed'] == 5
  _gen(Pipe('w2'), out, classes=('7',), num_per_class=1, seed=5)        # the new plan resumes


def test_pngs_outside_the_plan_never_enter_the_npz(tmp_path, caplog):
  out = tmp_path / 's'
  _gen(Pipe(), out)
  good = np.load(out / 'samples.npz')['arr_0']
  stray = protocol.image_name(9, 4)
  (out / stray).write_bytes((out / protocol.image_name(0, 1)).read_bytes())
  with caplog.at_level(logging.WARNING):
    _gen(Pipe(), out)
  assert f'1 sample PNGs are not in its plan (e.g. {stray})' in caplog.text, caplog.text
  np.testing.assert_array_equal(np.load(out / 'samples.npz')['arr_0'], good)


def test_unplanned_or_damaged_plan_folder_is_refused(tmp_path):
  out = tmp_path / 's'
  _gen(Pipe(), out)
  os.remove(out / protocol.PLAN_FILE)          # PNGs of unknown origin (an older var_jax, a copy)
  before = _state(out)
  for call in (lambda: _gen(Pipe(), out),
               lambda: protocol.check_folder_request(str(out), seed=1, dtype='float32', classes=None,
                                                     num_per_class=2, settings={})):
    with pytest.raises(ValueError, match=r'holds 4 sample PNGs \(e.g. 000000_class0001.png\) but no sample_plan'):
      call()
  assert _state(out) == before
  (out / protocol.PLAN_FILE).write_text('{not json')
  with pytest.raises(ValueError, match=rf'{protocol.PLAN_FILE}: not a readable sample plan'):
    _gen(Pipe(), out)
  _gen(Pipe(), out, overwrite=True)


def test_every_process_checks_the_plan(tmp_path, monkeypatch):
  """Two processes (simulated): process 0 records the plan once; process 1, holding other weights, refuses."""
  import jax
  from var_jax import distributed
  out = tmp_path / 's'
  labels = [1, 1]
  plan0 = protocol.folder_plan(Pipe(), labels, 1, protocol.sampling_options('var'), 'float32')
  plan1 = protocol.folder_plan(Pipe('w2'), labels, 1, protocol.sampling_options('var'), 'float32')
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed, 'barrier', lambda name, *a, **k: None)
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  protocol._prepare_folder_all(str(out), plan0, overwrite=False)
  assert protocol.read_plan(str(out)) == plan0
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with pytest.raises(ValueError, match='model.weights: sha256:w1 -> sha256:w2'):
    protocol._prepare_folder_all(str(out), plan1, overwrite=False)
  with pytest.raises(ValueError, match='model.weights'):     # not process 0: deletes and writes nothing, checks
    protocol._prepare_folder_all(str(out), plan1, overwrite=True)
  assert protocol.read_plan(str(out)) == plan0


def test_model_identity_is_the_weights_not_the_path(tmp_path):
  from conftest import fixture_dir
  from var_jax import VARPipeline
  import jax
  d = fixture_dir('tiny')
  a = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  a.save_checkpoint(tmp_path / 'm')
  b = VARPipeline.from_checkpoint(tmp_path / 'm')
  assert a.identity() == b.identity()
  b.var_variables = jax.tree.map(lambda x: x * 1.001, b.var_variables)
  assert a.identity()['weights'] != b.identity()['weights']
