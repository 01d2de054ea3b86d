"""TensorBoard and metrics.jsonl (issues 15, 17): the event files of a training run hold the sample grid /
reconstructions as images, codebook usage as histograms, the config as text and per-scale curves, learning rate and
throughput as scalars, for every family; a resumed run logs each step once (metrics.jsonl and TensorBoard) with the
values of an uninterrupted run; a remote workdir gets both files uploaded (nothing under the local home)."""
import json
import os
import shutil

import numpy as np
import pytest

from tests_helpers import load_config, quickstart_config
from var_jax import fileio
from var_jax.train import loop
from var_jax.train import metrics as metrics_lib

VOLATILE = ('time', 'step_time', 'images_per_s', 'tokens_per_s', 'mfu')


def _var(**kw):
  c = quickstart_config(total_steps=4, log_every=1, ckpt_every=2, eval_every=4, eval_batches=1, sample_every=4,
                        sample_classes=(0, 1))
  c.update(kw)
  return c


def _vqvae(**kw):
  """vqvae_trainer_test's 8px tokenizer."""
  c = load_config('vqvae_quickstart')
  c.data.update(image_size=8, mid_reso=1.0)
  c.vae.update(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
  c.disc.update(ndf=8, n_layers=1, norm='none')
  c.global_batch_size = 16
  c.update(dict(total_steps=4, log_every=1, ckpt_every=2, sample_every=4), **kw)
  return c


def _bae(**kw):
  """bae_trainer_test's 8px binary autoencoder."""
  c = load_config('bae_quickstart')
  c.data.update(image_size=8, mid_reso=1.0)
  c.bae.update(nf=32, ch_mult=(1, 1), res_blocks=1, attn_resolutions=(), resolution=8, codebook_size=8, emb_dim=32)
  c.disc.update(ndf=8, n_layers=1, norm='batch')
  c.global_batch_size = 16
  c.update(dict(total_steps=4, log_every=1, ckpt_every=2, sample_every=4), **kw)
  return c


def _elm(**kw):
  """bits_trainer_test's shrunk ELM AR quickstart."""
  c = load_config('elm_quickstart')
  c.data.update(image_size=8)
  c.bae.update(ch_mult=(1, 1), res_blocks=1, resolution=8, attn_resolutions=())
  c.model.update(dim=32, n_head=2, n_layer=1)
  c.global_batch_size = 16
  c.update(dict(total_steps=4, log_every=1, ckpt_every=2, eval_every=4, eval_batches=1, sample_every=4,
                sample_classes=(0, 1)), **kw)
  return c


# family -> (config, TensorBoard tags that must be there at the last step (4))
FAMILIES = {
    'var': (_var, ['samples', 'train/loss_scale/00', 'train/loss_scale/01', 'train/acc_scale/01', 'train/lr',
                   'train/images_per_s', 'train/loss', 'eval/loss']),
    'vqvae': (_vqvae, ['reconstructions', 'codebook/usage_scale/00', 'codebook/usage_scale/02',
                       'train/usage_scale/02', 'train/lr_g', 'train/lr_d', 'train/images_per_s', 'train/l1']),
    'bae': (_bae, ['reconstructions', 'codebook/bit_mean', 'codebook/bit_prob', 'train/bit_mean/07',
                   'train/lr_g', 'train/codebook_loss']),
    'elm_ar': (_elm, ['samples', 'train/loss', 'train/lr', 'train/images_per_s', 'train/tokens_per_s', 'eval/loss']),
}
KIND = {'samples': 'image', 'reconstructions': 'image', 'codebook': 'histogram'}


def _train(config, workdir):
  return loop.train(config.copy_and_resolve_references(), str(workdir))


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow   # a few minutes each on a loaded 2-core machine (compiles a train, eval and sample step)
@pytest.mark.parametrize('family', list(FAMILIES))
def test_event_files_hold_images_histograms_text_and_curves(family, tmp_path, monkeypatch):
  make, want = FAMILIES[family]
  monkeypatch.setattr(metrics_lib, 'peak_flops_per_device', lambda: 1e12)    # as on a TPU / GPU: MFU reported
  _train(make(), tmp_path)
  ev = metrics_lib.read_events(tmp_path / 'tensorboard')
  text = ev['config/text_summary']
  assert len(text) == 1 and text[0][0] == 0
  assert json.loads(text[0][2].strip('`\n'))['total_steps'] == 4          # the run's config, as JSON
  want = want + ['train/mfu']       # VAR: the analytic FLOP count, the others XLA's cost analysis
  for tag in want:
    assert tag in ev, (tag, sorted(ev))
    kind = KIND.get(tag.split('/')[0], 'scalar')
    steps = [r[0] for r in ev[tag]]
    assert all(r[1] == kind for r in ev[tag]), (tag, ev[tag][0][:2])
    if kind == 'scalar' and tag.startswith('train/'):
      assert steps == [1, 2, 3, 4], (tag, steps)                           # log_every=1
    else:
      assert steps == [4], (tag, steps)                                    # the sample / eval cadence
  for tag in want:
    kind = KIND.get(tag.split('/')[0], 'scalar')
    value = ev[tag][-1][2]
    if kind == 'image':
      assert value.startswith(b'\x89PNG')
      png = open(tmp_path / tag / 'step_00000004.png', 'rb').read()       # the grid on disk, the same image
      from PIL import Image
      import io
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(value))), np.asarray(Image.open(io.BytesIO(png))))
    elif kind == 'histogram':
      assert value.num > 0 and np.isfinite(value.sum)
  recs = {r['step']: r for r in _records(tmp_path) if r['split'] == 'train'}
  scalars = {t: dict((s, v) for s, _, v in ev[t]) for t in want if KIND.get(t.split('/')[0], 'scalar') == 'scalar'}
  if family == 'var':        # per-scale curves: the flat jsonl names, grouped in TensorBoard
    np.testing.assert_allclose(scalars['train/loss_scale/01'][3], recs[3]['loss_scale1'], rtol=1e-6)


@pytest.mark.slow   # two short runs per family
@pytest.mark.parametrize('family', ['var', 'elm_ar'])
def test_resume_after_a_crash_logs_each_step_once(family, tmp_path):
  """A run crashed after logging steps past its last checkpoint (simulated: its step-5 checkpoint removed, as if
  killed between the step-5 log line and that save): the resumed run drops steps 4-5 from metrics.jsonl and
  TensorBoard and logs them again, the values those of the uninterrupted run."""
  make, _ = FAMILIES[family]
  config = make(total_steps=5, ckpt_every=3, eval_every=3, sample_every=0)
  _train(config, tmp_path)
  straight = _records(tmp_path)
  assert [(r['step'], r['split']) for r in straight] == [(1, 'train'), (2, 'train'), (3, 'train'), (3, 'eval'),
                                                         (4, 'train'), (5, 'train'), (5, 'eval')]
  shutil.rmtree(tmp_path / 'checkpoints' / '5')
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "split": "train", "lo')                           # a line cut by the kill
  _train(config, tmp_path)
  resumed = _records(tmp_path)
  assert [(r['step'], r['split']) for r in resumed] == [(r['step'], r['split']) for r in straight]
  for a, b in zip(straight, resumed):
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
  ev = metrics_lib.read_events(tmp_path / 'tensorboard')
  assert len([f for f in os.listdir(tmp_path / 'tensorboard') if 'tfevents' in f]) == 2
  assert [s for s, _, _ in ev['train/loss']] == [1, 2, 3, 4, 5]            # steps 4-5 of the first run purged
  assert [s for s, _, _ in ev['eval/loss']] == [3, 5]
  want = {r['step']: r['loss'] for r in straight if r['split'] == 'train'}
  np.testing.assert_allclose([v for _, _, v in ev['train/loss']], [want[s] for s in range(1, 6)], rtol=1e-6)


def test_writer_truncates_purges_and_uploads_to_a_remote_workdir(tmp_path, monkeypatch):
  """The writer alone, with a stand-in remote workdir (``fileio.is_remote`` says so): files are staged in a
  temporary directory and uploaded whole at sync / close; a resume drops the later records remotely too."""
  remote = tmp_path / 'bucket' / 'run'
  monkeypatch.setattr(fileio, 'is_remote', lambda p: os.fspath(p).startswith(os.fspath(tmp_path / 'bucket')))
  w = metrics_lib.MetricWriter(str(remote), enabled=True, start_step=0,
                               vector_metrics={'loss_per_scale': 'loss_scale{}'})
  staging = w._local
  assert not staging.startswith(os.fspath(tmp_path)) and not staging.startswith(os.path.expanduser('~'))
  for s in range(1, 6):
    w.write(s, {'loss': 1.0 / s, 'loss_scale0': s, 'loss_scale1': 2 * s})
  w.summaries(5, metrics_lib.Summaries(images={'samples': np.full((4, 6, 3), 200, np.uint8)},
                                       histograms={'codebook/usage_scale/00': np.arange(10.0)}))
  assert [r['step'] for r in _records(remote)] == [1, 2, 3, 4, 5]          # uploaded at the summaries' sync
  w.close()
  assert not os.path.exists(staging)
  w = metrics_lib.MetricWriter(str(remote), enabled=True, start_step=3)
  assert [r['step'] for r in _records(remote)] == [1, 2, 3]                # at once, before any new step
  w.write(4, {'loss': 7.0})
  w.close()
  assert [r['step'] for r in _records(remote)] == [1, 2, 3, 4]
  ev = metrics_lib.read_events(remote / 'tensorboard')
  assert [(s, v) for s, _, v in ev['train/loss']] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 7.0)]
  assert [s for s, _, _ in ev['train/loss_scale/01']] == [1, 2, 3]
  assert ev['samples'] == [] and ev['codebook/usage_scale/00'] == []       # step 5: purged by the resume at 3
  raw = [e for f in sorted(os.listdir(remote / 'tensorboard'))
         for e in metrics_lib.read_event_file(remote / 'tensorboard' / f)]
  hist = [v.histo for e in raw if e.HasField('summary') for v in e.summary.value if v.tag.startswith('codebook')]
  assert len(hist) == 1 and hist[0].num == 10 and hist[0].sum == 45.0 and hist[0].max == 9.0


def test_compiled_flops_counts_a_matmul():
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda a, b: a @ b)
  flops = metrics_lib.compiled_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4)))
  assert flops == pytest.approx(2 * 8 * 16 * 4, rel=0.05)


def test_writer_on_a_fake_gcs_bucket(tmp_path, monkeypatch):
  """A real ``gs://`` workdir (the local GCS emulator): metrics.jsonl and the event files land in the bucket, nothing
  under the home directory; a resume truncates the bucket's metrics.jsonl."""
  pytest.importorskip('gcp_storage_emulator')
  from fake_gcs import FakeGCS
  home = tmp_path / 'home'
  home.mkdir()
  monkeypatch.setenv('HOME', str(home))
  with FakeGCS() as gcs:
    gcs.activate(monkeypatch)
    wd = gcs.root('run')
    w = metrics_lib.MetricWriter(wd, enabled=True, start_step=0)
    for s in (1, 2, 3):
      w.write(s, {'loss': float(s)})
    w.image(3, 'samples', np.zeros((4, 4, 3), np.uint8))
    w.close()
    metrics_lib.MetricWriter(wd, enabled=True, start_step=2).close()
    lines = (fileio.path(wd) / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['step'] for l in lines] == [1, 2]
    ev = metrics_lib.read_events(f'{wd}/tensorboard')
    assert [s for s, _, _ in ev['train/loss']] == [1, 2] and ev['samples'] == []
    assert len(list((fileio.path(wd) / 'tensorboard').iterdir())) == 2
  assert list(home.iterdir()) == []


def test_bits_sample_settings_are_checked_before_training():
  from var_jax import sharding as shd
  from var_jax.train import errors, tasks
  c = _elm()
  c.sample.topk = 5
  with pytest.raises(errors.ConfigError, match=r'config.sample has topk: not a setting of ELMPipeline.sample \(it '
                                               r'takes .*top_k'):
    tasks.build(c, shd.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}), 100)
