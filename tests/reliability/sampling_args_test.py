"""Issue 15, sampling arguments: one validator (``sampling.common.check_sampling_args`` / ``parse_class_labels``)
behind every family's ``sample`` / ``edit`` (errors name the argument) and the sample / evaluate CLIs (errors name
the flag, before any model is loaded). One class rule for both: labels are integers in [0, num_classes], where
num_classes is the unconditional class."""

import numpy as np
import pytest

from cli_cases import error_line, run_cli_cases
from tests_helpers import fixture_pipelines
from conftest import fixture_dir
from var_jax.eval import protocol
from var_jax.sampling.common import check_sampling_args, parse_class_labels, resolve_labels

INF, NAN = float('inf'), float('nan')


@pytest.fixture(scope='module')
def pipes():
  return fixture_pipelines()


# (families, argument, bad value, what the message says)
BAD = [
    ('var elm bigr', 'cfg', INF, 'cfg must be a finite number >= 0.0, got inf'),
    ('var elm bigr', 'cfg', NAN, 'cfg must be a finite number >= 0.0, got nan'),
    ('var elm bigr', 'cfg', -1.0, 'cfg must be a finite number >= 0.0, got -1.0'),
    ('var elm', 'top_k', -1, 'top_k must be an integer >= 0, got -1'),
    ('var elm', 'top_k', 1.5, 'top_k must be an integer >= 0, got 1.5'),
    ('var', 'top_p', 1.5, 'top_p must be a finite number in [0.0, 1.0], got 1.5'),
    ('var', 'top_p', -0.1, 'top_p must be a finite number in [0.0, 1.0], got -0.1'),
    ('var', 'top_p', NAN, 'top_p must be a finite number in [0.0, 1.0], got nan'),
    ('var', 'more_smooth', 1, 'more_smooth must be a bool (True/False), got 1'),
    ('var elm bigr', 'batch_size', 0, 'batch_size must be an integer >= 1, got 0'),
    ('var elm bigr', 'batch_size', -2, 'batch_size must be an integer >= 1, got -2'),
    ('var elm bigr', 'batch_size', 2.5, 'batch_size must be an integer >= 1, got 2.5'),
    ('var elm bigr', 'num_samples', 0, 'num_samples must be an integer >= 1, got 0'),
    ('elm bigr', 'temperature', INF, 'temperature must be a finite number >= 0.0, got inf'),
    ('elm bigr', 'temperature', NAN, 'temperature must be a finite number >= 0.0, got nan'),
    ('elm bigr', 'temperature', 0.0, 'temperature must be > 0'),
    ('elm bigr', 'num_iter', 0, 'num_iter must be'),
    ('bigr', 'infer_steps', 0, 'infer_steps must be an integer >= 1, got 0'),
    ('bigr', 'gumbel_temp', -0.5, 'gumbel_temp must be a finite number >= 0.0, got -0.5'),
    ('bigr', 'gumbel_temp', INF, 'gumbel_temp must be a finite number >= 0.0, got inf'),
]
CASES = [(f, a, v, m) for fams, a, v, m in BAD for f in fams.split()]


@pytest.mark.parametrize('family,arg,value,msg', CASES, ids=[f'{f}-{a}={v}' for f, a, v, _ in CASES])
def test_pipeline_sample_rejects_bad_argument(pipes, family, arg, value, msg):
  kw = {'num_samples': 2, arg: value} if arg != 'num_samples' else {arg: value}
  with pytest.raises(ValueError) as e:
    pipes[family].sample(3, 0, **kw)
  assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


@pytest.mark.parametrize('family', ['var', 'elm', 'bigr'])
def test_pipeline_seeds_and_labels(pipes, family):
  pipe, nc = pipes[family], pipes[family].num_classes
  for seed in (-1, 2 ** 32):
    with pytest.raises(ValueError, match=rf'rng: int seed {seed} is outside \[0, 2\^32\)'):
      pipe.sample(0, seed, num_samples=1)
  for labels, msg in ((1.5, 'labels must be integers'), ([], 'labels must be integers'),
                      ([0, nc + 1], rf'class labels must lie in \[0, {nc}\] \({nc} = unconditional\)'),
                      (-1, 'class label out of range')):
    with pytest.raises(ValueError, match=msg):
      pipe.sample(labels, 0, num_samples=1 if np.ndim(labels) == 0 else None)


def test_edit_validates_like_sample(pipes):
  pipe = pipes['var']
  s = pipe.vae_config.image_size
  for kw, msg in (({'cfg': INF}, 'cfg must be a finite number'), ({'top_p': 2.0}, 'top_p must be'),
                  ({'batch_size': 0}, 'batch_size must be')):
    with pytest.raises(ValueError, match=msg):
      pipe.edit(np.zeros((1, s, s, 3), np.float32), np.ones((s, s)), 0, 0, **kw)


@pytest.mark.parametrize('family', ['var', 'elm', 'bigr'])
def test_one_class_rule_for_api_and_cli(pipes, family):
  """num_classes is the unconditional class in the pipelines and on the command line; num_classes + 1 is out of
  range in both."""
  nc = pipes[family].num_classes
  assert resolve_labels([nc], None, None, nc).tolist() == [nc]
  assert protocol.sample_plan(nc, [str(nc)], 2) == [nc, nc]
  with pytest.raises(ValueError, match=rf'labels must lie in \[0, {nc}\]'):
    resolve_labels([nc + 1], None, None, nc)
  with pytest.raises(ValueError, match=rf'--classes: class {nc + 1} is out of range .*{nc} = unconditional'):
    protocol.sample_plan(nc, [str(nc + 1)], 1)


def test_validator_names_and_class_parsing():
  check_sampling_args(cfg=1.5, top_k=0, top_p=0.0, batch_size=1, seed=2 ** 32 - 1, more_smooth=False,
                      num_iter=None, temperature=None)
  with pytest.raises(ValueError, match=r'^--seed must be an integer in \[0, 2\^32\), got 4294967296$'):
    check_sampling_args('--', seed=2 ** 32)
  with pytest.raises(ValueError, match=r'^--num_per_class must be an integer >= 1, got 0$'):
    protocol.sample_plan(10, None, 0)
  assert parse_class_labels([' 3', '10'], 10) == [3, 10]
  for given, msg in ((['1.5'], "'1.5' is not an integer class label"), ([], 'empty list of class labels'),
                     (['1', ''], "'' is not an integer class label"), (['x'], "'x' is not an integer")):
    with pytest.raises(ValueError, match=msg):
      parse_class_labels(given, 10)


def test_cli_flags_checked_before_the_model(tmp_path):
  """Every bad sampling flag of sample / evaluate: exit 1, one ``error:`` line naming the flag, no traceback. The
  weights named do not exist: an error naming the flag (not the file) shows the flags were checked first."""
  base = ['--vae_ckpt=/nonexistent/vae.pth', '--var_ckpt=/nonexistent/var.pth', f'--out={tmp_path / "g.png"}']
  cases = [
      (['--cfg=inf'], '--cfg must be a finite number >= 0.0, got inf'),
      (['--cfg=nan'], '--cfg must be a finite number >= 0.0, got nan'),
      (['--cfg=-2'], '--cfg must be a finite number >= 0.0, got -2.0'),
      (['--top_k=-1'], '--top_k must be an integer >= 0, got -1'),
      (['--top_p=1.5'], '--top_p must be a finite number in [0.0, 1.0], got 1.5'),
      (['--batch_size=0'], '--batch_size must be an integer >= 1, got 0'),
      (['--num_per_class=0'], '--num_per_class must be an integer >= 1, got 0'),
      (['--seed=-1'], '--seed must be an integer in [0, 2^32), got -1'),
      (['--seed=4294967296'], '--seed must be an integer in [0, 2^32), got 4294967296'),
      (['--temperature=inf'], '--temperature must be a finite number >= 0.0, got inf'),
      (['--gumbel_temp=-1'], '--gumbel_temp must be a finite number >= 0.0, got -1.0'),
      (['--num_iter=0'], '--num_iter must be an integer >= 1, got 0'),
      (['--infer_steps=0'], '--infer_steps must be an integer >= 1, got 0'),
      (['--grid_cols=0'], '--grid_cols must be an integer >= 1, got 0'),
      (['--classes=1.5'], "--classes: '1.5' is not an integer class label"),
      (['--classes='], '--classes: empty list of class labels'),
      (['--classes=1,,2'], "--classes: '' is not an integer class label"),
  ]
  runs = [['var_jax.sample', *base, *a] for a, _ in cases]
  ev = ['--vae_ckpt=/nonexistent/vae.pth', '--var_ckpt=/nonexistent/var.pth', f'--out_dir={tmp_path / "ev"}']
  ev_cases = [(['--cfg=inf'], '--cfg must be a finite number'), (['--classes=a'], "--classes: 'a' is not an integer"),
              (['--batch_size=0'], '--batch_size must be an integer >= 1')]
  runs += [['var_jax.evaluate', *ev, *a] for a, _ in ev_cases]
  d = fixture_dir('tiny')   # the range of --classes needs the model: checked after loading, before sampling
  runs.append(['var_jax.sample', f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--classes=0,11',
               f'--out={tmp_path / "g.png"}'])
  results = run_cli_cases(runs, tmp_path)
  for (args, msg), r in zip(cases + ev_cases, results):
    line = error_line(r)
    assert msg in line and 'nonexistent' not in line, (args, line)
  assert 'class 11 is out of range for a model with 10 classes (0..9, or 10 = unconditional)' in error_line(
      results[-1])
  assert not (tmp_path / 'g.png').exists() and not (tmp_path / 'ev' / 'metrics.json').exists()
