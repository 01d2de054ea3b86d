"""var_jax.scaling: power-law fits (closed forms, scipy, coverage), run collection, compute frontier, plot and CLI."""
import json
import logging
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tests_helpers import REPO, load_config
from var_jax.eval import scaling


# ---------------------------------------------------------------------------------------------------------------
# synthetic run directories
# ---------------------------------------------------------------------------------------------------------------

def make_run(d, *, n_params=1000, flops=1.0, gbs=1, evals=((10, 3.0, 40.0),), extra_lines=(), info_extra=None,
             run_info=True):
  """A run directory as var_jax.train writes it; ``evals``: (step, loss, acc) triples."""
  os.makedirs(d, exist_ok=True)
  if run_info:
    info = {'n_params': n_params, 'n_params_non_embedding': n_params - 10, 'depth': 2, 'embed_dim': 64,
            'seq_len': 30, 'train_flops_per_image': flops, 'global_batch_size': gbs}
    info.update(info_extra or {})
    with open(os.path.join(d, 'run_info.json'), 'w') as f:
      json.dump(info, f)
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump({'model': {'depth': 2}}, f)
  lines = []
  for step, loss, acc in evals:
    lines.append(json.dumps({'step': step, 'split': 'train', 'time': 0.0, 'loss': loss + 0.1, 'acc': acc}))
    lines.append(json.dumps({'step': step, 'split': 'eval', 'time': 0.0, 'loss': loss, 'acc': acc,
                             'loss_last': loss + 1.0, 'acc_last': acc / 2, 'examples': 297.0}))
  lines.extend(extra_lines)
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(d)


ALPHA_N, BETA_N = -0.1, 2e-4        # the synthetic sweep's law: final loss = (BETA_N * N)^ALPHA_N


def make_sweep(root, n_runs=4):
  """Runs of sizes 1e4..1e7 following the law exactly at their final eval, each with a 3-point eval curve."""
  dirs = []
  for i in range(n_runs):
    n = 10 ** (4 + i)
    final = (BETA_N * n) ** ALPHA_N
    evals = [(50, final * 1.6, 20.0 + i), (100, final * 1.2, 30.0 + i), (200, final, 40.0 + 5 * i)]
    dirs.append(make_run(os.path.join(root, f'd{i + 2}'), n_params=n, flops=6.0 * n, gbs=8, evals=evals))
  return dirs


# ---------------------------------------------------------------------------------------------------------------
# t quantile
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('q', [0.6, 0.9, 0.975, 0.995, 0.9999])
def test_t_quantile_closed_forms(q):
  # df = 1: Cauchy, tan(pi (q - 1/2)); df = 2: t = u sqrt(2 / (1 - u^2)), u = 2q - 1
  assert scaling.t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)
  u = 2 * q - 1
  assert scaling.t_quantile(q, 2) == pytest.approx(u * math.sqrt(2 / (1 - u * u)), rel=1e-10)
  # df -> infinity: the normal quantile
  assert scaling.t_quantile(q, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(q), rel=1e-5)
  assert scaling.t_quantile(1 - q, 3) == -scaling.t_quantile(q, 3)


@pytest.mark.parametrize('df', [1, 2, 3, 4.5, 7, 30, 200])
def test_t_quantile_vs_scipy(df):
  for q in (0.5, 0.55, 0.8, 0.95, 0.975, 0.995, 0.025):
    assert scaling.t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# fit_power_law
# ---------------------------------------------------------------------------------------------------------------

def test_fit_recovers_noiseless_law_exactly():
  x = np.geomspace(1e6, 3e9, 7)
  for alpha, beta in [(-0.0998, 2.5e-8), (-0.5, 1e-3), (0.3, 7.0)]:
    fit = scaling.fit_power_law(x, (beta * x) ** alpha)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.beta == pytest.approx(beta, rel=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.n == 7
    assert fit.alpha_stderr < 1e-10 and fit.alpha_ci[1] - fit.alpha_ci[0] < 1e-9
    assert fit.beta_ci[0] <= fit.beta * (1 + 1e-8) and fit.beta_ci[1] >= fit.beta * (1 - 1e-8)
    np.testing.assert_allclose(fit.predict(x), (beta * x) ** alpha, rtol=1e-10)
    assert fit.x_range == (x.min(), x.max())


def test_fit_matches_scipy_linregress_and_t_interval():
  rng = np.random.default_rng(1)
  x = np.geomspace(1e5, 1e8, 9)
  y = (3e-6 * x) ** -0.2 * np.exp(rng.normal(0, 0.05, x.size))
  fit = scaling.fit_power_law(x, y, level=0.9)
  lr = stats.linregress(np.log(x), np.log(y))
  assert fit.alpha == pytest.approx(lr.slope, rel=1e-12)
  assert fit.alpha_stderr == pytest.approx(lr.stderr, rel=1e-10)
  assert fit.r2 == pytest.approx(lr.rvalue ** 2, rel=1e-12)
  assert math.log(fit.beta) == pytest.approx(lr.intercept / lr.slope, rel=1e-12)
  t = stats.t.ppf(0.95, x.size - 2)
  assert fit.alpha_ci == pytest.approx((lr.slope - t * lr.stderr, lr.slope + t * lr.stderr), rel=1e-10)
  # delta method for log beta = a / b from linregress's intercept and slope errors (cov(a, b) = -mean(u) var(b))
  a, b, ub = lr.intercept, lr.slope, np.log(x).mean()
  var_lb = lr.intercept_stderr ** 2 / b ** 2 + a ** 2 * lr.stderr ** 2 / b ** 4 + 2 * a * ub * lr.stderr ** 2 / b ** 3
  lb = a / b
  assert fit.beta_ci == pytest.approx((math.exp(lb - t * math.sqrt(var_lb)), math.exp(lb + t * math.sqrt(var_lb))),
                                      rel=1e-8)


def test_fit_ci_coverage_on_noisy_data():
  """Gaussian noise in log y: the t interval should contain the true alpha in ~level of the trials, and the
  reported stderr should match the spread of the estimates."""
  rng = np.random.default_rng(0)
  alpha, beta, sigma = -0.08, 1e-6, 0.03
  x = np.geomspace(1e6, 1e9, 6)
  trials, hits, est, se = 600, 0, [], []
  for _ in range(trials):
    y = (beta * x) ** alpha * np.exp(rng.normal(0, sigma, x.size))
    fit = scaling.fit_power_law(x, y)
    hits += fit.alpha_ci[0] <= alpha <= fit.alpha_ci[1]
    est.append(fit.alpha)
    se.append(fit.alpha_stderr)
  cover = hits / trials     # binomial sd at 0.95, 600 trials: 0.009
  assert 0.92 <= cover <= 0.98, cover
  assert np.mean(est) == pytest.approx(alpha, abs=4 * np.std(est) / math.sqrt(trials))
  true_sd = sigma / math.sqrt(np.sum((np.log(x) - np.log(x).mean()) ** 2))
  assert np.std(est) == pytest.approx(true_sd, rel=0.1)
  assert np.sqrt(np.mean(np.square(se))) == pytest.approx(true_sd, rel=0.1)


def test_fit_bootstrap_is_seeded():
  rng = np.random.default_rng(3)
  x = np.geomspace(1e6, 1e9, 8)
  y = (1e-6 * x) ** -0.1 * np.exp(rng.normal(0, 0.02, x.size))
  f1 = scaling.fit_power_law(x, y, bootstrap=300, seed=7)
  f2 = scaling.fit_power_law(x, y, bootstrap=300, seed=7)
  f3 = scaling.fit_power_law(x, y, bootstrap=300, seed=8)
  assert f1.alpha_ci_bootstrap == f2.alpha_ci_bootstrap and f1.beta_ci_bootstrap == f2.beta_ci_bootstrap
  assert f1.alpha_ci_bootstrap != f3.alpha_ci_bootstrap
  assert f1.bootstrap == 300 and f1.seed == 7
  lo, hi = f1.alpha_ci_bootstrap
  assert lo < f1.alpha < hi and hi - lo < 0.1
  assert f1.beta_ci_bootstrap[0] < f1.beta < f1.beta_ci_bootstrap[1]
  assert f1.alpha == scaling.fit_power_law(x, y).alpha     # the point estimate does not depend on the bootstrap
  noiseless = scaling.fit_power_law(x, (1e-6 * x) ** -0.1, bootstrap=50, seed=0)
  np.testing.assert_allclose(noiseless.alpha_ci_bootstrap, -0.1, rtol=1e-10)
  assert 'bootstrap CI' in str(f1) and json.dumps(f1.to_dict())


@pytest.mark.parametrize('x, y, match', [
    ([1, 2], [1, 2], 'at least 3 points'),
    ([1, 2, 3], [1, 0, 3], 'positive finite'),
    ([1, -2, 3], [1, 2, 3], 'positive finite'),
    ([1, 2, np.nan], [1, 2, 3], 'positive finite'),
    ([5, 5, 5], [1, 2, 3], '2 distinct x'),
    ([1, 2, 3], [1, 2], 'differ in length'),
])
def test_fit_guards(x, y, match):
  with pytest.raises(ValueError, match=match):
    scaling.fit_power_law(x, y)


# ---------------------------------------------------------------------------------------------------------------
# collect_runs
# ---------------------------------------------------------------------------------------------------------------

def test_collect_runs_reads_records(tmp_path):
  a = make_run(tmp_path / 'big', n_params=5000, flops=2.0, gbs=4,
               evals=[(10, 4.0, 20.0), (20, 3.0, 30.0), (30, 2.5, 50.0)], extra_lines=[''])
  b = make_run(tmp_path / 'small', n_params=1000, flops=3.0, gbs=2, evals=[(5, 5.0, 10.0)])
  (tmp_path / 'scaling.png').write_bytes(b'not a run')       # a file matched by the glob is not a run
  recs = scaling.collect_runs(str(tmp_path / '*'))
  assert [r.name for r in recs] == ['small', 'big']          # by parameter count
  small, big = recs
  assert big.path == a and small.path == b
  assert (big.n_params, big.n_params_non_embedding, big.depth, big.embed_dim) == (5000, 4990, 2, 64)
  assert big.step == 30 and big.compute == 2.0 * 4 * 30 and big.loss == 2.5 and big.err == pytest.approx(0.5)
  assert big.pf_days == big.compute / (1e15 * 86400) and big.examples == 120
  np.testing.assert_array_equal(big.curve.step, [10, 20, 30])
  np.testing.assert_allclose(big.curve.compute, [80, 160, 240])
  np.testing.assert_allclose(big.curve.loss, [4.0, 3.0, 2.5])
  np.testing.assert_allclose(big.curve.err, [0.8, 0.7, 0.5])
  assert small.size('n_params') == 1000 and small.size('n_params_non_embedding') == 990
  last = scaling.collect_runs([a], tokens='last')[0]         # loss_last / acc_last
  assert last.loss == 3.5 and last.err == pytest.approx(0.75)
  json.dumps(big.to_dict())
  # the same directory twice (path and pattern) is one run; paths as a list
  assert len(scaling.collect_runs([a, str(tmp_path / 'bi*')])) == 1


def test_collect_runs_resumed_run_keeps_later_eval(tmp_path):
  later = json.dumps({'step': 20, 'split': 'eval', 'time': 1.0, 'loss': 2.0, 'acc': 60.0})
  d = make_run(tmp_path / 'r', evals=[(10, 4.0, 20.0), (20, 3.0, 30.0)], extra_lines=[later])
  r = scaling.collect_runs(d)[0]
  assert r.step == 20 and r.loss == 2.0 and list(r.curve.loss) == [4.0, 2.0]


def test_collect_runs_same_basename_uses_path(tmp_path):
  a = make_run(tmp_path / 'x' / 'run', n_params=10)
  b = make_run(tmp_path / 'y' / 'run', n_params=20)
  assert [r.name for r in scaling.collect_runs([a, b])] == [a, b]


@pytest.mark.parametrize('case, match', [
    ('no_run_info', r'no run_info\.json'),
    ('bad_run_info', r'run_info\.json: malformed JSON'),
    ('run_info_missing_key', r"run_info\.json: missing \['train_flops_per_image'\]"),
    ('run_info_bad_value', r'global_batch_size must be a positive number'),
    ('no_metrics', r'no metrics\.jsonl'),
    ('malformed_line', r'metrics\.jsonl:5: malformed JSON line'),
    ('not_an_object', r'metrics\.jsonl:5: expected an object'),
    ('eval_without_loss', r"metrics\.jsonl:5: eval line without \['loss', 'acc'\]"),
    ('non_numeric', r'metrics\.jsonl:5: non-numeric'),
    ('bad_acc', r'metrics\.jsonl:5: invalid eval values'),
    ('no_evals', r'metrics\.jsonl: no eval lines'),
])
def test_collect_runs_errors_name_the_file(tmp_path, case, match):
  d = str(tmp_path / 'broken')
  evals = [(10, 4.0, 20.0), (20, 3.0, 30.0)]
  bad_line = {'malformed_line': '{"step": 30, "split": "ev', 'not_an_object': '[1, 2]',
              'eval_without_loss': '{"step": 30, "split": "eval", "time": 0}',
              'non_numeric': '{"step": 30, "split": "eval", "loss": "x", "acc": 3}',
              'bad_acc': '{"step": 30, "split": "eval", "loss": 1.0, "acc": 130}'}.get(case)
  make_run(d, evals=[] if case == 'no_evals' else evals, run_info=case != 'no_run_info',
           extra_lines=[bad_line] if bad_line else [],
           info_extra={'global_batch_size': 0} if case == 'run_info_bad_value' else None)
  if case == 'bad_run_info':
    with open(os.path.join(d, 'run_info.json'), 'w') as f:
      f.write('{"n_params": 3,')
  if case == 'run_info_missing_key':
    with open(os.path.join(d, 'run_info.json'), 'w') as f:
      json.dump({'n_params': 3, 'global_batch_size': 4}, f)
  if case == 'no_metrics':
    os.remove(os.path.join(d, 'metrics.jsonl'))
  with pytest.raises(scaling.RunError, match=match) as e:
    scaling.collect_runs([d])
  assert d in str(e.value)


def test_collect_runs_warn_skips_named_run(tmp_path, caplog):
  good = make_run(tmp_path / 'good')
  bad = make_run(tmp_path / 'bad', run_info=False)
  with caplog.at_level(logging.WARNING):
    recs = scaling.collect_runs(str(tmp_path / '*'), on_error='warn')
  assert [r.name for r in recs] == ['good'] and recs[0].path == good
  assert any(f'skipping run {bad}' in m and 'no run_info.json' in m for m in caplog.messages), caplog.messages
  with pytest.raises(scaling.RunError, match='no readable runs'):
    scaling.collect_runs([bad], on_error='warn')


def test_collect_runs_path_errors(tmp_path):
  with pytest.raises(scaling.RunError, match='no paths match'):
    scaling.collect_runs(str(tmp_path / 'nothing*'))
  with pytest.raises(scaling.RunError, match='no such directory'):
    scaling.collect_runs(str(tmp_path / 'missing'))
  (tmp_path / 'f.txt').write_text('x')
  with pytest.raises(scaling.RunError, match='not a directory'):
    scaling.collect_runs(str(tmp_path / 'f.txt'))
  with pytest.raises(scaling.RunError, match='matches no directories'):
    scaling.collect_runs(str(tmp_path / '*.txt'))
  with pytest.raises(ValueError, match='on_error'):
    scaling.collect_runs(str(tmp_path), on_error='ignore')


# ---------------------------------------------------------------------------------------------------------------
# compute frontier and fit_scaling
# ---------------------------------------------------------------------------------------------------------------

def test_compute_frontier_hand_made(tmp_path):
  # flops = gbs = 1: compute = step.   A: 1 2 4     B: 2 4 8       C: 4 8 16 32
  make_run(tmp_path / 'A', n_params=1, evals=[(1, 5.0, 10.0), (2, 4.0, 20.0), (4, 3.5, 30.0)])
  make_run(tmp_path / 'B', n_params=2, evals=[(2, 4.5, 15.0), (4, 3.0, 35.0), (8, 2.9, 40.0)])
  make_run(tmp_path / 'C', n_params=3, evals=[(4, 3.8, 12.0), (8, 3.0, 50.0), (16, 2.5, 60.0), (32, 2.5, 61.0)])
  recs = scaling.collect_runs(str(tmp_path / '*'))
  fr = scaling.compute_frontier(recs, 'loss')
  # at C=2: A's 4.0 beats B's 4.5; at C=4: B's 3.0 beats A's 3.5 and C's 3.8; at C=8: B's 2.9 < C's 3.0;
  # C's 2.5 at 32 is no lower than its 2.5 at 16
  np.testing.assert_array_equal(fr.compute, [1, 2, 4, 8, 16])
  np.testing.assert_array_equal(fr.value, [5.0, 4.0, 3.0, 2.9, 2.5])
  assert fr.run == ['A', 'A', 'B', 'B', 'C'] and list(fr.step) == [1, 2, 4, 8, 16]
  fe = scaling.compute_frontier(recs, 'err')
  # err: A .9 .8 .7 | B .85 .65 .6 | C .88 .5 .4 .39
  np.testing.assert_array_equal(fe.compute, [1, 2, 4, 8, 16, 32])
  np.testing.assert_allclose(fe.value, [0.9, 0.8, 0.65, 0.5, 0.4, 0.39])
  assert fe.run == ['A', 'A', 'B', 'C', 'C', 'C']
  with pytest.raises(ValueError, match='metric'):
    scaling.compute_frontier(recs, 'acc')


def test_fit_scaling_recovers_sweep_law(tmp_path, caplog):
  recs = scaling.collect_runs(make_sweep(tmp_path))
  fits = scaling.fit_scaling(recs, level=0.9)
  assert set(fits) == set(scaling.FIT_NAMES)
  assert fits['loss_vs_N'].alpha == pytest.approx(ALPHA_N, rel=1e-10)
  assert fits['loss_vs_N'].beta == pytest.approx(BETA_N, rel=1e-8)
  assert fits['loss_vs_N'].level == 0.9 and fits['loss_vs_N'].n == 4
  fr = scaling.compute_frontier(recs, 'loss')
  assert fits['loss_vs_C'].n == len(fr.compute)
  np.testing.assert_allclose(fits['loss_vs_C'].alpha, scaling.fit_power_law(fr.compute, fr.value).alpha)
  # two runs: no N fits (2 points); strict raises naming the fit, non-strict leaves them out with a warning
  two = recs[:2]
  with pytest.raises(ValueError, match='loss_vs_N: a power-law fit needs at least 3 points'):
    scaling.fit_scaling(two)
  with caplog.at_level(logging.WARNING):
    fits2 = scaling.fit_scaling(two, strict=False)
  assert set(fits2) == {'loss_vs_C', 'err_vs_C'}
  assert any('no loss_vs_N fit' in m for m in caplog.messages)


# ---------------------------------------------------------------------------------------------------------------
# plot and command line
# ---------------------------------------------------------------------------------------------------------------

def test_plot_needs_matplotlib_message(tmp_path, monkeypatch):
  recs = scaling.collect_runs(make_sweep(tmp_path))
  for m in [k for k in sys.modules if k == 'matplotlib' or k.startswith('matplotlib.')]:
    monkeypatch.delitem(sys.modules, m)
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(ImportError, match='pip install matplotlib'):
    scaling.plot_scaling(recs, {}, str(tmp_path / 'x.png'))


def test_cli_run_writes_png_and_json(tmp_path):
  import matplotlib  # noqa: F401  (a test dependency: fail, do not skip, when it is missing)
  import io
  from PIL import Image
  make_sweep(tmp_path / 'sweep')
  out, js, buf = tmp_path / 'sweep' / 'scaling.png', tmp_path / 'fits.json', io.StringIO()
  recs, fits = scaling.run([str(tmp_path / 'sweep' / '*')], out=str(out), json_path=str(js), bootstrap=100,
                           stream=buf)
  text = buf.getvalue()
  assert 'd2' in text and 'd5' in text and 'loss_vs_N' in text and 'bootstrap CI' in text
  assert f'{ALPHA_N:.4f}' in text
  with Image.open(out) as im:
    assert im.format == 'PNG' and im.size[0] > 800 and im.size[1] > 600
  payload = json.loads(js.read_text())
  assert payload['fits']['loss_vs_N']['alpha'] == pytest.approx(ALPHA_N, rel=1e-10)
  assert len(payload['runs']) == 4 and payload['runs'][0]['curve']['step'] == [50, 100, 200]
  assert payload['frontier']['loss']['run'][-1] == 'd5' and payload['settings']['bootstrap'] == 100
  # rerunning over the same glob: the PNG now in the folder is not a run
  recs2, _ = scaling.run([str(tmp_path / 'sweep' / '*')], stream=io.StringIO())
  assert len(recs2) == 4


def test_cli_subprocess(tmp_path):
  make_sweep(tmp_path / 'sweep')
  make_run(tmp_path / 'sweep' / 'broken', run_info=False)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'var_jax.scaling', f'--runs={tmp_path}/sweep/*', f'--json={tmp_path}/f.json',
         '--skip_bad', '--params=n_params_non_embedding']
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'skipping run' in p.stderr and 'broken: no run_info.json' in p.stderr and 'loss_vs_N' in p.stdout
  fits = json.loads((tmp_path / 'f.json').read_text())['fits']
  assert fits['loss_vs_N']['n'] == 4 and fits['loss_vs_N']['alpha'] != pytest.approx(ALPHA_N, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# the sweep config
# ---------------------------------------------------------------------------------------------------------------

def test_sweep_config_depth_argument():
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg_scaling_sweep', REPO / 'configs' / 'scaling_sweep.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for arg, depth in [('2', 2), ('6', 6), (None, 4)]:
    c = mod.get_config(arg)
    assert (c.model.depth, c.model.embed_dim, c.model.num_heads) == (depth, 32 * depth, depth)
    assert c.data.name == 'digits' and c.data.eval_split == 'val' and c.eval_batches == -1
    assert 0 < c.eval_every < c.epochs * 24
  assert load_config('scaling_sweep').model.depth == 4     # what configs_test.py loads
  with pytest.raises(ValueError, match='depth'):
    mod.get_config('0')
