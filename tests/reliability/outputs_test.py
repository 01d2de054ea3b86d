"""Issue 15, outputs: the destination is checked before any model is loaded or image sampled (``--out`` /
``--out_dir`` of sample and evaluate), every file is written atomically (``var_jax.fileio``: a failing write leaves
no partial file and keeps the old one), and a resumed ``--out_dir`` holding a damaged PNG or a stray temporary file
regenerates that image (with a warning naming it) instead of crashing the ``samples.npz`` assembly."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cli_cases import error_line, run_cli_cases
from var_jax import fileio, images
from var_jax.eval import evaluator, protocol
from var_jax.interop.state_dict import load_state_dict, save_state_dict


class FakePipe:
  """A VAR-like pipeline whose sample i is a fixed function of (seed, i): the protocol's file handling, no model."""
  family, num_classes = 'var', 10

  def __init__(self):
    self.drawn = []

  def sample(self, labels, seed, *, sample_ids, batch_size=None, dtype=None, **opts):
    self.drawn += list(sample_ids)
    ids = np.asarray(sample_ids, np.float32)[:, None, None, None]
    x = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(1, 16, 16, 3)
    return np.mod(x + ids * 0.137 + seed * 0.01, 1.0), None


def _write(pipe, out_dir, labels, **kw):
  return protocol.write_samples(pipe, labels, seed=1, cfg=None, top_k=None, top_p=None, more_smooth=False,
                                batch_size=2, dtype='float32', out_dir=str(out_dir), **kw)


def test_resume_regenerates_damaged_pngs_and_drops_stray_temp_files(tmp_path, caplog):
  labels = protocol.sample_plan(10, ['1', '4', '7'], 2)
  out_dir = tmp_path / 's'
  assert _write(FakePipe(), out_dir, labels) == 6
  good = np.load(out_dir / 'samples.npz')['arr_0']
  names = [protocol.image_name(i, l) for i, l in enumerate(labels)]
  # a kill mid-write (an earlier non-atomic writer), a corrupt file, temporary files of both writers' names
  data = (out_dir / names[1]).read_bytes()
  (out_dir / names[1]).write_bytes(data[:len(data) // 2])
  (out_dir / names[4]).write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
  (out_dir / f'.{names[2]}.tmp-123-abcdef01').write_bytes(data[:10])
  (out_dir / f'{names[3]}.tmp.png').write_bytes(data[:10])
  pipe = FakePipe()
  with caplog.at_level(logging.WARNING):
    assert _write(pipe, out_dir, labels) == 2
  assert sorted(pipe.drawn) == [1, 4]
  log = caplog.text
  assert f'{out_dir / names[1]} is damaged' in log and f'{out_dir / names[4]} is damaged' in log, log
  assert f'.{names[2]}.tmp-123-abcdef01' in log and f'{names[3]}.tmp.png' in log, log
  assert sorted(os.listdir(out_dir)) == sorted(names + ['samples.npz', protocol.PLAN_FILE])
  np.testing.assert_array_equal(np.load(out_dir / 'samples.npz')['arr_0'], good)


def test_npz_assembly_names_a_damaged_png(tmp_path):
  labels = [0, 1]
  _write(FakePipe(), tmp_path, labels)
  p = tmp_path / protocol.image_name(1, 1)
  p.write_bytes(p.read_bytes()[:40])
  with pytest.raises(ValueError, match=rf'{p}: damaged sample image'):
    protocol.write_npz(str(tmp_path), labels)


@pytest.mark.parametrize('bad', ['dir_as_out', 'under_file', 'suffix', 'out_dir_is_file', 'out_dir_under_file',
                                 'neither'])
def test_destination_checked_before_sampling(tmp_path, bad):
  (tmp_path / 'afile').write_text('x')
  (tmp_path / 'adir').mkdir()
  out, out_dir, msg = {
      'dir_as_out': (tmp_path / 'adir', None, f'--out: {tmp_path / "adir"} is a directory, not a file'),
      'under_file': (tmp_path / 'afile' / 'g.png', None, f'--out: {tmp_path / "afile"} exists and is not a directory'),
      'suffix': (tmp_path / 'g.jpg', None, f'--out: {tmp_path / "g.jpg"} must end with .png'),
      'out_dir_is_file': (None, tmp_path / 'afile', f'--out_dir: {tmp_path / "afile"} exists and is not a directory'),
      'out_dir_under_file': (None, tmp_path / 'afile' / 's', f'--out_dir: cannot create directory'),
      'neither': (None, None, 'give --out (a grid PNG) and/or --out_dir'),
  }[bad]
  pipe = FakePipe()
  with pytest.raises((ValueError, fileio.OutputError)) as e:
    protocol.generate_samples(pipe, str(out_dir) if out_dir else None, [0, 1], out=str(out) if out else None)
  assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
  assert pipe.drawn == []                                              # nothing sampled
  assert sorted(os.listdir(tmp_path)) == ['adir', 'afile'] and os.listdir(tmp_path / 'adir') == []


def _disk_full(*args, **kwargs):
  raise OSError(28, 'No space left on device')


def test_failed_writes_leave_the_old_file(tmp_path, monkeypatch):
  """PNG, samples.npz, metrics.json and reference-layout weights (.pth, .safetensors): a write failing midway
  (here: the disk fills up at the flush) leaves the earlier file as it was and no temporary file behind."""
  png = tmp_path / 'a.png'
  images.write_png(str(png), np.zeros((4, 4, 3), np.uint8))
  before = png.read_bytes()

  def save_partly(self, f, **kwargs):
    f.write(b'partial')
    _disk_full()
  with monkeypatch.context() as m:
    m.setattr(Image.Image, 'save', save_partly)
    with pytest.raises(OSError, match='No space left'):
      images.write_png(str(png), np.ones((4, 4, 3), np.uint8))
  assert png.read_bytes() == before

  evaluator.write_metrics(str(tmp_path), {'fid': 1.0}, log=lambda s: None)
  sd = {'w': np.arange(6, dtype=np.float32)}
  for name in ('m.pth', 'm.safetensors'):
    save_state_dict(sd, tmp_path / name)
  with monkeypatch.context() as m:
    m.setattr(fileio.os, 'fsync', _disk_full)
    with pytest.raises(OSError, match='No space left'):
      evaluator.write_metrics(str(tmp_path), {'fid': 2.0}, log=lambda s: None)
    with pytest.raises(OSError, match='No space left'):
      _write(FakePipe(), tmp_path / 's', [0])
    for name in ('m.pth', 'm.safetensors'):
      with pytest.raises(OSError, match='No space left'):
        save_state_dict({'w': np.zeros(6, np.float32)}, tmp_path / name)
  assert json.loads((tmp_path / 'metrics.json').read_text()) == {'fid': 1.0}
  for name in ('m.pth', 'm.safetensors'):
    np.testing.assert_array_equal(load_state_dict(tmp_path / name)['w'], sd['w'])
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'm.pth', 'm.safetensors', 'metrics.json', 's']
  assert os.listdir(tmp_path / 's') == []          # the PNG's write failed: nothing under its name, no temp file


def test_cli_destination_errors_before_the_model(tmp_path):
  """sample / evaluate with a bad destination: exit 1, one ``error:`` line naming the flag and path, before any
  model is loaded (the weights named do not exist, and the error is not about them), nothing written."""
  (tmp_path / 'afile').write_text('x')
  (tmp_path / 'adir').mkdir()
  model = ['--vae_ckpt=/nonexistent/vae.pth', '--var_ckpt=/nonexistent/var.pth']
  cases = [
      (['var_jax.sample', f'--out={tmp_path / "adir"}'], f'--out: {tmp_path / "adir"} is a directory, not a file'),
      (['var_jax.sample', f'--out={tmp_path / "adir"}/'], 'names a directory, not a file'),
      (['var_jax.sample', f'--out={tmp_path / "afile" / "g.png"}'], f'--out: {tmp_path / "afile"} exists and is not'),
      (['var_jax.sample', f'--out={tmp_path / "g.jpg"}'], f'--out: {tmp_path / "g.jpg"} must end with .png'),
      (['var_jax.sample', f'--out_dir={tmp_path / "afile"}'], f'--out_dir: {tmp_path / "afile"} exists and is not'),
      (['var_jax.sample', f'--out_dir={tmp_path / "afile" / "s"}'], '--out_dir: cannot create directory'),
      (['var_jax.sample', '--out_dir=/proc/var_jax_out'], '--out_dir: cannot create directory /proc/var_jax_out'),
      (['var_jax.sample'], 'give --out (a grid PNG) and/or --out_dir'),
      (['var_jax.evaluate', f'--out_dir={tmp_path / "afile"}'], f'--out_dir: {tmp_path / "afile"} exists and is not'),
      (['var_jax.evaluate', f'--out_dir={tmp_path / "afile" / "e"}'], '--out_dir: cannot create directory'),
  ]
  results = run_cli_cases([[c[0], *model, *c[1:]] for c, _ in cases], tmp_path)
  for (c, msg), r in zip(cases, results):
    line = error_line(r)
    assert msg in line and 'nonexistent' not in line, (c, line)
    assert 'Unable to initialize backend' not in r['stderr']
  assert sorted(os.listdir(tmp_path)) == ['adir', 'afile', 'cli_cases.json'] and not os.listdir(tmp_path / 'adir')
