"""ELM / BiGR training run directories load with no hand-typed model arguments: ``ELMPipeline`` /
``BiGRPipeline.from_checkpoint(run_dir)``, ``load_pipeline(checkpoint=run_dir)`` and ``--checkpoint`` of the sample /
evaluate CLIs read the run's ``model_args.json`` (the exported generator, its ModelArgs, the BAE and its config), so
the 32 px quickstart runs sample 32 px images; ``--bae_ckpt/--model_ckpt`` pointing into a run use its json too.

Fast: run directories written by the trainer's own ``export`` (``var_jax.train.tasks.bits``) from freshly
initialised quickstart models (what a training run leaves, minus the training). Slow: real 2-step quickstart
training runs of both families, sampled through the CLI."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from tests_helpers import load_config, process_env
from var_jax import BiGRPipeline, ELMPipeline
from var_jax.eval import protocol
from var_jax.images import to_uint8
from var_jax.models.bae import BinaryAutoEncoder
from var_jax.pipelines import pretrained
from var_jax.train.tasks import bits as bt

KINDS = ('elm_ar', 'elm_mlm', 'bigr')
CLI_KINDS = ('elm_ar', 'bigr')          # the sample CLI: one ELM (MLM loads the same way), and BiGR
QUICKSTART = {'elm_ar': 'elm_quickstart', 'elm_mlm': 'elm_mlm_quickstart', 'bigr': 'bigr_quickstart'}
PIPELINE = {'elm_ar': ELMPipeline, 'elm_mlm': ELMPipeline, 'bigr': BiGRPipeline}
MODEL_FILE = {'elm_ar': 'model.pth', 'elm_mlm': 'model.pth', 'bigr': 'bigr.pt'}
# what a user had to type before (the ModelArgs the weights cannot tell, for the quickstart models)
_NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)   # the digits quickstarts' recipe
HAND_ARGS = {'elm_ar': dict(n_head=4, block_size=16, multiple_of=32, **_NO_DROPOUT),
             'elm_mlm': dict(n_head=4, multiple_of=32, smoothing=0.0, pause_num=0, **_NO_DROPOUT),
             'bigr': dict(n_head=4, multiple_of=32, p_flip=True, infer_steps=16, **_NO_DROPOUT)}
FAST_SAMPLING = {'elm_ar': dict(top_k=5), 'elm_mlm': dict(top_k=5, num_iter=2), 'bigr': dict(num_iter=2, infer_steps=2)}
CLI_SAMPLING = {'elm_ar': ['--top_k=5'], 'bigr': ['--num_iter=2', '--infer_steps=2']}


def _config(kind, **overrides):
  c = load_config(QUICKSTART[kind])
  c.update(overrides)
  return c


def _random_bae(bae_cfg):
  """BAE variables of the right shapes, random values: without running the BAE's init (a forward pass, ~15 s on
  a loaded 2-core CPU); a loader test needs no trained or reference-initialised tokenizer."""
  s = bae_cfg.resolution
  shapes = jax.eval_shape(lambda: bt.unbox(BinaryAutoEncoder(bae_cfg).init(
      jax.random.key(0), jnp.zeros((1, s, s, bae_cfg.in_channels)), train=False)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype), shapes)


def _export_run(kind, workdir, bae_vars):
  """The quickstart model of ``kind`` (fresh init) and a random-init BAE, written by the trainer's ``export``."""
  config = _config(kind)
  bae_cfg, cfg = bt.model_configs(config)
  model = bt.make_model(kind, cfg)
  params = jax.jit(lambda k: bt.unbox(model.init(k, *bt.dummy_inputs(kind, cfg))['params']))(jax.random.key(3))
  bt.export(str(workdir), config, kind, cfg, bae_cfg, jax.device_get(params), bae_vars, 0)
  return dict(kind=kind, dir=str(workdir), cfg=cfg, bae_cfg=bae_cfg, params=params, bae_vars=bae_vars)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  bae_vars = _random_bae(bt.model_configs(_config(KINDS[0]))[0])      # both quickstarts: the same BAE config
  return {kind: _export_run(kind, tmp_path_factory.mktemp(kind), bae_vars) for kind in KINDS}


def _model_config(pipe):
  return pipe.bigr_config if pipe.family == 'bigr' else pipe.elm_config


def _model_variables(pipe):
  return pipe.bigr_variables if pipe.family == 'bigr' else pipe.elm_variables


def _assert_same_tree(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


@pytest.mark.parametrize('kind', KINDS)
def test_from_checkpoint_equals_the_hand_built_pipeline(runs, kind):
  run = runs[kind]
  pipe = PIPELINE[kind].from_checkpoint(run['dir'])
  assert pipe.image_size == 32 and pipe.latent_size == 4
  assert pipe.bae_config == run['bae_cfg']                       # the trained BAE config, resolution 32
  assert bt.reference_model_args(kind, _model_config(pipe)) == bt.reference_model_args(kind, run['cfg'])
  _assert_same_tree(_model_variables(pipe)['params'], run['params'])
  _assert_same_tree(pipe.bae_variables['params'], run['bae_vars']['params'])
  # what a user had to type before: the same pipeline
  hand = PIPELINE[kind].from_torch(os.path.join(run['dir'], 'binaryae.th'), os.path.join(run['dir'], MODEL_FILE[kind]),
                                   **HAND_ARGS[kind])
  assert _model_config(hand) == _model_config(pipe) and hand.bae_config == pipe.bae_config
  images, _ = pipe.sample([1, 7], rng=0, shard=False, **FAST_SAMPLING[kind])
  assert images.shape == (2, 32, 32, 3) and np.all(np.isfinite(images))
  want, _ = hand.sample([1, 7], rng=0, shard=False, **FAST_SAMPLING[kind])
  np.testing.assert_array_equal(images, want)


@pytest.mark.parametrize('kind', KINDS)
def test_load_pipeline_reads_the_run(runs, kind):
  run = runs[kind]
  pipe = pretrained.load_pipeline(checkpoint=run['dir'])
  assert type(pipe) is PIPELINE[kind] and pipe.image_size == 32
  family = PIPELINE[kind].family
  assert _model_config(pretrained.load_pipeline(checkpoint=run['dir'], model=family)) == _model_config(pipe)
  # --model_args update the json's
  if kind == 'bigr':
    assert pretrained.load_pipeline(checkpoint=run['dir'], model_args='infer_steps=3').bigr_config.infer_steps == 3
  # the command: --bae_ckpt/--model_ckpt into the run, no --model_args: the json beside the model gives them
  files = dict(bae_ckpt=os.path.join(run['dir'], 'binaryae.th'), model_ckpt=os.path.join(run['dir'], MODEL_FILE[kind]))
  beside = pretrained.load_pipeline(**files)
  assert _model_config(beside) == _model_config(pipe) and beside.bae_config == pipe.bae_config
  if kind == 'elm_ar':   # explicit --model_args are used as given (here: the reference's default 16x16 grid)
    assert pretrained.load_pipeline(**files, model_args='n_head=4').image_size == 128


def test_wrong_family_missing_json_and_other_errors(runs, tmp_path):
  elm, bigr = runs['elm_ar']['dir'], runs['bigr']['dir']
  with pytest.raises(ValueError, match=rf"{elm}/model_args.json: an ELM run \(task 'elm_ar'\), not a BiGR run.*"
                                       r'ELMPipeline.from_checkpoint'):
    BiGRPipeline.from_checkpoint(elm)
  with pytest.raises(ValueError, match=rf"{bigr}/model_args.json: a BiGR run \(task 'bigr'\), not an ELM run"):
    ELMPipeline.from_checkpoint(bigr)
  for model in ('bigr', 'var'):
    with pytest.raises(ValueError, match=rf"{elm}/model_args.json: an ELM run .*not --model={model}"):
      pretrained.load_pipeline(checkpoint=elm, model=model)
  with pytest.raises(ValueError, match='give either --checkpoint .* or --bae_ckpt, not both'):
    pretrained.load_pipeline(checkpoint=elm, bae_ckpt=os.path.join(elm, 'binaryae.th'))
  # a directory without model_args.json
  empty = tmp_path / 'empty'
  empty.mkdir()
  for load in (lambda: ELMPipeline.from_checkpoint(empty), lambda: pretrained.load_pipeline(checkpoint=str(empty),
                                                                                            model='elm')):
    with pytest.raises(ValueError, match=rf'{empty} is not an ELM/BiGR training run directory: it has no '
                                         r'model_args.json \(expected the workdir of `python -m var_jax.train`'):
      load()
  with pytest.raises(FileNotFoundError, match='no such ELM/BiGR run directory'):
    BiGRPipeline.from_checkpoint(tmp_path / 'nope')
  # bae_file: a path (the config.bae_ckpt a run used) is read as written; a missing one names the json
  moved = tmp_path / 'moved'
  shutil.copytree(elm, moved)
  os.rename(moved / 'binaryae.th', tmp_path / 'bae_elsewhere.th')
  info = json.loads((moved / 'model_args.json').read_text())
  (moved / 'model_args.json').write_text(json.dumps(dict(info, bae_file=str(tmp_path / 'bae_elsewhere.th'))))
  assert ELMPipeline.from_checkpoint(moved).image_size == 32
  (moved / 'model_args.json').write_text(json.dumps(dict(info, bae_file='binaryae.th')))
  with pytest.raises(FileNotFoundError, match=r"model_args.json: its bae_file 'binaryae.th' is neither in"):
    ELMPipeline.from_checkpoint(moved)
  # an inconsistent or damaged json
  (moved / 'model_args.json').write_text(json.dumps(dict(info, bae_file=str(tmp_path / 'bae_elsewhere.th'),
                                                         bae_resolution=64)))
  with pytest.raises(ValueError, match=r'4x4 grid x BAE downsample 8 gives 32 px images, but the run trained on '
                                       r'bae_resolution=64'):
    ELMPipeline.from_checkpoint(moved)
  (moved / 'model_args.json').write_text(json.dumps(dict(info, task='vqvae')))
  with pytest.raises(ValueError, match="task 'vqvae' is not an ELM/BiGR task"):
    ELMPipeline.from_checkpoint(moved)
  (moved / 'model_args.json').write_text('{"task": "elm_ar", ')
  with pytest.raises(ValueError, match='model_args.json: not valid JSON'):
    pretrained.load_pipeline(checkpoint=str(moved))


def _cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=process_env(1), capture_output=True,
                        text=True, timeout=600)


def _check_cli_samples(pipe, kind, out_dir, labels):
  """The PNGs and samples.npz the sample CLI wrote are the pipeline's images with the CLI's settings."""
  pngs = sorted(f for f in os.listdir(out_dir) if f.endswith('.png'))
  assert pngs == [protocol.image_name(i, label) for i, label in enumerate(labels)]
  assert np.asarray(Image.open(os.path.join(out_dir, pngs[0]))).shape == (32, 32, 3)
  arr = np.load(os.path.join(out_dir, 'samples.npz'))['arr_0']
  opts = protocol.sampling_options(pipe.family, **FAST_SAMPLING[kind])
  want, _ = pipe.sample(labels, 0, sample_ids=list(range(len(labels))), shard=False, **opts)
  # the same draws; the BAE's float decode may round a pixel the other way (here: 'highest' matmul precision)
  diff = np.abs(arr.astype(np.int32) - to_uint8(want).astype(np.int32))
  assert arr.shape == want.shape and diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))


@pytest.mark.parametrize('kind', CLI_KINDS)
def test_sample_cli_with_the_run_dir(runs, kind, tmp_path):
  run = runs[kind]
  out = tmp_path / 's'
  r = _cli('var_jax.sample', f'--checkpoint={run["dir"]}', '--classes=3', '--num_per_class=2', f'--out_dir={out}',
           *CLI_SAMPLING[kind])
  assert r.returncode == 0, r.stderr[-3000:]
  _check_cli_samples(PIPELINE[kind].from_checkpoint(run['dir']), kind, out, [3, 3])
  if kind == 'elm_ar':
    # the exact command (--bae_ckpt/--model_ckpt into the run, no --model_args): the same images
    out2 = tmp_path / 's2'
    r = _cli('var_jax.sample', f'--bae_ckpt={run["dir"]}/binaryae.th', f'--model_ckpt={run["dir"]}/model.pth',
             '--classes=3', '--num_per_class=2', f'--out_dir={out2}', *CLI_SAMPLING[kind])
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out2 / 'samples.npz')['arr_0'], np.load(out / 'samples.npz')['arr_0'])
  else:
    # evaluate routes --checkpoint the same way: the BiGR pipeline loads (and --rfid is refused as VAR-only)
    r = _cli('var_jax.evaluate', f'--checkpoint={run["dir"]}', '--rfid', '--config=configs/bigr_quickstart.py',
             f'--out_dir={tmp_path / "ev"}')
    assert r.returncode == 1 and 'error: --rfid and --test_loss are implemented for VAR checkpoints' in r.stderr, \
        r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('kind', CLI_KINDS)
def test_trained_quickstart_samples_through_the_cli(kind, tmp_path):
  """A real (2-step) quickstart training run of each family, then ``--checkpoint=<workdir>``."""
  from var_jax.train import loop
  workdir = str(tmp_path / 'run')
  loop.train(_config(kind, total_steps=2, global_batch_size=16, log_every=1, ckpt_every=1000, eval_every=1000,
                     eval_batches=1), workdir)
  info = json.loads((tmp_path / 'run' / 'model_args.json').read_text())
  assert info['task'] == kind and info['step'] == 2 and info['bae_file'] == 'binaryae.th'
  pipe = PIPELINE[kind].from_checkpoint(workdir)
  assert pipe.image_size == 32 and pipe.bae_config == bt.model_configs(_config(kind))[0]
  out = tmp_path / 's'
  r = _cli('var_jax.sample', f'--checkpoint={workdir}', '--classes=1,2', '--num_per_class=1', f'--out_dir={out}',
           *CLI_SAMPLING[kind])
  assert r.returncode == 0, r.stderr[-3000:]
  _check_cli_samples(pipe, kind, out, [1, 2])
