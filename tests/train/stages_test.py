"""Multi-stage runs (var_jax.train.stages, configs/digits.py): a tokenizer then a generator from one config, each in
its own sub-directory, the generator reading the tokenizer's export; finished stages skipped on a rerun; the final
digits quality score and grid; the quality score logged during training."""
import json
import logging
import os

import pytest

from tests_helpers import REPO, load_config
from var_jax.train import errors
from var_jax.train import stages


def _tiny(tmp_steps=2):
  """configs/digits.py (VAR) shrunk to 8px: VQVAE (1, 2, 4) scales, a depth-1 VAR; a few steps each."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_digits', REPO / 'configs' / 'digits.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('var')
  tok, var = c.stages.tokenizer, c.stages.var
  vae = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2, 4))
  tok.data.update(image_size=8, mid_reso=1.0)
  tok.vae.update(vae)
  tok.disc.update(ndf=8, n_layers=1, norm='none')
  tok.update(global_batch_size=16, total_steps=tmp_steps, log_every=1, ckpt_every=tmp_steps, sample_every=0)
  var.data.update(image_size=8, mid_reso=1.0)
  var.vae.update(vae)
  var.model.update(vocab_size=32, z_channels=8, depth=1, embed_dim=32, num_heads=1, patch_nums=(1, 2, 4))
  var.update(global_batch_size=16, total_steps=tmp_steps, log_every=1, ckpt_every=tmp_steps, eval_every=0,
             sample_every=tmp_steps, quality_per_class=2, sample_classes=(0, 1))
  c.final.update(per_class=2, grid_per_class=2)
  return c


def test_references_resolve_to_stage_dirs():
  c = _tiny()
  dirs = stages.stage_dirs(c, '/w')
  assert dirs == {'tokenizer': '/w/tokenizer', 'var': '/w/var'}
  assert c.stages.var.vae_ckpt == '{tokenizer}/vqvae.safetensors'
  assert stages.resolve(c.stages.var, dirs).vae_ckpt == '/w/tokenizer/vqvae.safetensors'
  assert c.stages.var.vae_ckpt == '{tokenizer}/vqvae.safetensors'          # the config itself is unchanged
  stages.check(c)


@pytest.mark.parametrize('family', ['var', 'elm', 'bigr'])
def test_every_family_config_links_its_tokenizer(family):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_digits', REPO / 'configs' / 'digits.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(family)
  stages.check(c)
  assert tuple(c.stage_order) == ('tokenizer', family)
  gen = stages.resolve(c.stages[family], stages.stage_dirs(c, '/w'))
  key = 'vae_ckpt' if family == 'var' else 'bae_ckpt'
  assert gen[key].startswith('/w/tokenizer/')
  assert gen.quality_per_class == 50 and gen.sample_every > 0     # the score is logged while it trains
  assert gen.data.name == 'digits' and c.stages.tokenizer.task == 'tokenizer'


def test_bad_stage_lists_are_one_error():
  c = _tiny()
  c.stage_order = ('var', 'tokenizer')                 # the generator before the stage it reads
  with pytest.raises(errors.ConfigError, match=r'refers to stage \{tokenizer\}, which is not an earlier stage'):
    stages.check(c)
  c = _tiny()
  c.stage_order = ('tokenizer', 'nope')
  with pytest.raises(errors.ConfigError, match=r"names \['nope'\]"):
    stages.check(c)


def test_quality_needs_digits():
  c = load_config('quickstart')
  c.data.name = 'folder'
  c.quality_per_class = 50
  from var_jax.train.tasks import base
  with pytest.raises(errors.ConfigError, match='quality_per_class=50 scores samples of the built-in digits'):
    base.check_quality_config(c, 10)
  c.quality_per_class = 0
  base.check_quality_config(c, 10)


def test_two_stages_train_skip_and_score(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='var_jax')
  c = _tiny()
  w = str(tmp_path / 'run')
  score = stages.run(c, w)
  assert os.path.exists(f'{w}/tokenizer/vqvae.safetensors') and os.path.isdir(f'{w}/var/model')
  assert json.load(open(f'{w}/var/config.json'))['vae_ckpt'] == f'{w}/tokenizer/vqvae.safetensors'
  assert os.path.exists(f'{w}/samples.png')
  q = json.load(open(f'{w}/quality.json'))
  assert q['per_class'] == 2 and q['model'] == f'{w}/var/model'
  assert {'class_acc', 'fd', 'real_class_acc', 'real_fd'} <= set(q) and q['class_acc'] == score['class_acc']
  # the quality score was logged at the VAR stage's sample step
  recs = [json.loads(l) for l in open(f'{w}/var/metrics.jsonl')]
  assert [r['step'] for r in recs if r['split'] == 'quality'] == [2]
  assert any('quality step 2: digits quality' in r.getMessage() for r in caplog.records)

  # a rerun skips both stages (nothing trains: the checkpoints stay as they are) and scores again
  caplog.clear()
  mtime = os.path.getmtime(f'{w}/var/model')
  stages.run(c, w)
  msgs = [r.getMessage() for r in caplog.records]
  assert sum('finished in' in m and 'skipped' in m for m in msgs) == 2
  assert os.path.getmtime(f'{w}/var/model') == mtime

  # a changed generator stage trains again from its checkpoint; the tokenizer stays skipped
  caplog.clear()
  c.stages.var.total_steps = 3
  stages.run(c, w)
  msgs = [r.getMessage() for r in caplog.records]
  assert any('stage tokenizer: finished' in m for m in msgs)
  assert any('resumed from step 2' in m for m in msgs)
  assert json.load(open(f'{w}/var/stage.json'))['config']['total_steps'] == 3
