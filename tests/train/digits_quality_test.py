"""It learns: README's main job (configs/digits.py: a tokenizer, then a generator on the built-in digits) trains models
whose samples follow their class, for every family, measured by the digits quality score (var_jax.eval.digits) and
asserted at the thresholds README states. A change that stops learning (a wrong loss, a broken sampler default, an
export without the EMA, a tokenizer link to the wrong file) fails here.

Each test runs the command exactly as README gives it (the CLI, in a subprocess: its own JAX, as a user runs it),
for README's main job (VAR) then scores the exported model again through the sample and evaluate CLIs, at the
sampling settings the run's config.json holds, as an outside check would."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests_helpers import REPO, process_env

# family: (class accuracy %, Frechet distance / the real data's), the targets of README's quality table
THRESHOLDS = {'var': (90.0, 2.0), 'elm': (80.0, 3.0), 'bigr': (80.0, 3.0)}
# ELM and BiGR train the same BAE (configs/bae_quickstart.py): the second family's run starts from a copy of the
# first's finished tokenizer stage, which the stage runner then skips (its stage.json matches), as a rerun would
_BAE_STAGE = {}


def _run(args, timeout):
  p = subprocess.run([sys.executable, *args], cwd=REPO, env=process_env(1), capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  return p.stdout + p.stderr


def _check(score, family):
  acc, fd_ratio = THRESHOLDS[family]
  assert score['class_acc'] >= acc, score
  assert score['fd'] <= fd_ratio * score['real_fd'], score
  assert min(score[f'class_acc/{c}'] for c in range(10)) >= 50.0, score     # no class left out


@pytest.mark.slow   # 7-10 minutes each on a 2-core CPU (BiGR reuses ELM's tokenizer stage: ~4 minutes)
@pytest.mark.parametrize('family', ['var', 'elm', 'bigr'])
def test_main_job_learns(family, tmp_path):
  w = str(tmp_path / 'run')
  if family != 'var' and 'dir' in _BAE_STAGE:
    shutil.copytree(_BAE_STAGE['dir'], f'{w}/tokenizer')
  out = _run(['-m', 'var_jax.train', f'--config=configs/digits.py:{family}', f'--workdir={w}'], timeout=1500)
  assert 'digits quality: class accuracy' in out and 'img/s' in out and 'eval step' in out
  score = json.load(open(f'{w}/quality.json'))
  _check(score, family)
  if family != 'var':
    _BAE_STAGE['dir'] = f'{w}/tokenizer'
  assert score['unconditional_class_acc'] < 40.0, score      # the class is what the model was asked for
  assert os.path.exists(f'{w}/samples.png')
  gen = f'{w}/{family}'
  recs = [json.loads(l) for l in open(f'{gen}/metrics.jsonl')]
  assert [r for r in recs if r['split'] == 'quality'], 'the quality score is logged while the generator trains'

  if family != 'var':
    export = {'elm': 'model.pth', 'bigr': 'bigr.pt'}[family]     # the reference layouts' file names
    assert os.path.exists(f'{gen}/{export}') and os.path.exists(f'{w}/tokenizer/binaryae.th')
    return          # CI's budget: the outside check once, on README's main job (the CLIs load every family's run
                    # directory: tests/pipelines/run_dir_test.py; a rerun skipping finished stages:
                    # tests/train/stages_test.py)
  # an outside check: the exported model through the sample CLI at the run's own sampling settings, then evaluate
  cfg = json.load(open(f'{gen}/config.json'))
  model = f'{gen}/model' if family == 'var' else gen
  flags = [f'--{k}={v}' for k, v in cfg['sample'].items()]
  _run(['-m', 'var_jax.sample', f'--checkpoint={model}', '--num_per_class=50', f'--out_dir={tmp_path}/samples',
        *flags], timeout=600)
  _run(['-m', 'var_jax.evaluate', '--digits', f'--samples={tmp_path}/samples',
        f'--checkpoint={model}', f'--out_dir={tmp_path}/eval'], timeout=600)
  ev = json.load(open(f'{tmp_path}/eval/metrics.json'))
  _check({k[len('digits_'):]: v for k, v in ev.items() if k.startswith('digits_')}, family)
