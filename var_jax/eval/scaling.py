r"""Scaling laws of VAR runs: collect, fit and plot final test loss / error rate against model size and compute.

The library of

  python -m var_jax.scaling --runs='/tmp/var_scaling/d*' --out=/tmp/var_scaling/scaling.png --json=fits.json

Reads the run directories written by ``python -m var_jax.train`` (``run_info.json``: parameter count and training
FLOPs per image; ``metrics.jsonl``: the eval lines), and fits the VAR paper's power laws (Tian et al. 2024, Sec. 5)

  L = (beta * X)^alpha,   X = N (parameters) or C (training FLOPs),   alpha < 0,

by least squares in log-log space: ``log L = alpha * log beta + alpha * log X``. Exponents come with Student-t
confidence intervals (and optionally percentile-bootstrap ones); the plot has four log-log panels (test loss and
token error rate against N and against C).

What is fitted against what:

- **N**: each run's *final* eval (its last eval line) against its parameter count (``n_params``, or
  ``n_params_non_embedding`` as in Kaplan et al.). Runs should be trained on the same data for the same number of
  examples (a warning names the runs when they are not).
- **C**: training compute at an eval step ``s`` is ``C = train_flops_per_image * global_batch_size * s``
  (forward + backward, transformer only: the frozen tokenizer is not counted; 1 PF-day = 1e15 * 86400 FLOPs). The
  fit uses the *compute-efficient frontier* of all runs' eval curves together: the points (C_i, L_i) that attain a
  new minimum of ``min{L_j : C_j <= C_i}``, i.e. the lowest loss reached by any run with at most that much compute
  (Kaplan et al. 2020; Hoffmann et al. 2022). Points inside a run whose learning rate has not decayed yet sit above
  where a run *planned* for that compute would be, so the frontier is an upper envelope of the optimum: evaluate
  often enough that the frontier has several points, and read the exponent as indicative.

Test "loss" is the eval split's mean token cross-entropy over all scales (``--tokens=last``: the last scale only,
the paper's other variant); the error rate is ``1 - acc / 100`` over the same tokens.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging
from scipy import stats

from var_jax import fileio

PF_DAY = 1e15 * 86400.0           # FLOPs in one petaflop/s-day
FIT_NAMES = ('loss_vs_N', 'err_vs_N', 'loss_vs_C', 'err_vs_C')
PARAM_KEYS = ('n_params', 'n_params_non_embedding')
_REQUIRED_INFO = ('n_params', 'train_flops_per_image', 'global_batch_size')
_METRIC_KEYS = {'all': ('loss', 'acc'), 'last': ('loss_last', 'acc_last')}


class RunError(ValueError):
  """A run directory (or one of its files) that cannot be used; the message names the path and the reason."""


# ---------------------------------------------------------------------------------------------------------------
# collecting runs
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalCurve:
  """A run's eval points, by increasing step: training compute (FLOPs) so far, test loss and token error rate."""
  step: np.ndarray
  compute: np.ndarray
  loss: np.ndarray
  err: np.ndarray

  def to_dict(self) -> dict:
    return {k: getattr(self, k).tolist() for k in ('step', 'compute', 'loss', 'err')}


@dataclasses.dataclass
class RunRecord:
  """One training run: size, and compute / test loss / error rate at its final eval, plus the whole eval curve."""
  name: str
  path: str
  n_params: int
  n_params_non_embedding: Optional[int]
  depth: Optional[int]
  embed_dim: Optional[int]
  train_flops_per_image: float
  global_batch_size: int
  step: int                 # final eval step
  compute: float            # FLOPs at the final eval
  loss: float               # final eval loss
  err: float                # final eval error rate, 1 - acc / 100
  curve: EvalCurve

  @property
  def pf_days(self) -> float:
    return self.compute / PF_DAY

  @property
  def examples(self) -> int:
    """Training examples seen at the final eval."""
    return self.step * self.global_batch_size

  def size(self, param_key: str = 'n_params') -> float:
    if param_key not in PARAM_KEYS:
      raise ValueError(f'param_key must be one of {PARAM_KEYS}, got {param_key!r}')
    v = getattr(self, param_key)
    if v is None:
      raise RunError(f'{self.path}: run_info.json has no {param_key!r}')
    return float(v)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'curve'}
    d['pf_days'] = self.pf_days
    d['curve'] = self.curve.to_dict()
    return d


def _expand(dirs_or_globs: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]) -> List[str]:
  """Run directories from paths and glob patterns, in order, without duplicates. A pattern matching nothing or a
  named path that is not a directory is an error; files matched by a pattern (a plot, a JSON) are not runs."""
  if isinstance(dirs_or_globs, (str, os.PathLike)):
    dirs_or_globs = [dirs_or_globs]
  out, seen = [], set()
  for pattern in dirs_or_globs:
    pattern = os.fspath(pattern)
    remote = fileio.is_remote(pattern)
    pattern = pattern if remote else os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(_glob(pattern))
      if not matches:
        raise RunError(f'no paths match {pattern!r}')
      dirs = [m for m in matches if fileio.isdir(m)]
      if not dirs:
        raise RunError(f'{pattern!r} matches no directories (only {matches[:5]})')
      for m in matches:
        if m not in dirs:
          logging.debug('%s: not a directory, not a run', m)
    else:
      if not fileio.isdir(pattern):
        raise RunError(f'{pattern}: not a directory' if fileio.exists(pattern) else f'{pattern}: no such directory')
      dirs = [pattern]
    for d in dirs:
      key = d.rstrip('/') if remote else os.path.realpath(d)
      if key not in seen:
        seen.add(key)
        out.append(d.rstrip('/') if remote else os.path.normpath(d))
  return out


def _glob(pattern: str) -> List[str]:
  """``glob.glob`` locally; remote (gs://): epath's glob below the part of the pattern without wildcards."""
  if not fileio.is_remote(pattern):
    return glob.glob(pattern)
  scheme, rest = pattern.split('://', 1)
  parts = rest.split('/')
  i = next(k for k, p in enumerate(parts) if glob.has_magic(p))
  base = f'{scheme}://' + '/'.join(parts[:i])
  out = []
  for m in fileio.path(base).glob('/'.join(parts[i:])):
    m = os.fspath(m)
    out.append(m if '://' in m else f'{scheme}://{m}')
  return out


def _read_run_info(run_dir: str) -> dict:
  path = os.path.join(run_dir, 'run_info.json')
  if not fileio.isfile(path):
    raise RunError(f'{run_dir}: no run_info.json (var_jax.train writes it when training starts; is this a run '
                   f'directory?)')
  try:
    info = json.loads(fileio.path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunError(f'{path}: malformed JSON ({e})') from e
  if not isinstance(info, dict):
    raise RunError(f'{path}: expected a JSON object, got {type(info).__name__}')
  missing = [k for k in _REQUIRED_INFO if k not in info]
  if missing:
    raise RunError(f'{path}: missing {missing} (has {sorted(info)})')
  for k in _REQUIRED_INFO:
    v = info[k]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
      raise RunError(f'{path}: {k} must be a positive number, got {v!r}')
  return info


def _read_eval_lines(run_dir: str, tokens: str) -> Dict[int, Tuple[float, float]]:
  """{step: (loss, acc)} from the eval lines of metrics.jsonl; a step evaluated twice (a resumed run) keeps the
  later line."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not fileio.isfile(path):
    raise RunError(f'{run_dir}: no metrics.jsonl (has the run started?)')
  loss_key, acc_key = _METRIC_KEYS[tokens]
  evals: Dict[int, Tuple[float, float]] = {}
  with fileio.path(path).open('r') as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      where = f'{path}:{lineno}'
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise RunError(f'{where}: malformed JSON line ({e}): {line[:100]!r}') from e
      if not isinstance(rec, dict) or 'split' not in rec or 'step' not in rec:
        raise RunError(f'{where}: expected an object with "step" and "split": {line[:100]!r}')
      if rec['split'] != 'eval':
        continue
      missing = [k for k in (loss_key, acc_key) if k not in rec]
      if missing:
        raise RunError(f'{where}: eval line without {missing} (an eval that saw no examples?): {line[:100]!r}')
      step, loss, acc = rec['step'], rec[loss_key], rec[acc_key]
      try:
        step, loss, acc = int(step), float(loss), float(acc)
      except (TypeError, ValueError) as e:
        raise RunError(f'{where}: non-numeric step/{loss_key}/{acc_key}: {line[:100]!r}') from e
      if step <= 0 or not math.isfinite(loss) or not 0.0 <= acc <= 100.0:
        raise RunError(f'{where}: invalid eval values step={step} {loss_key}={loss} {acc_key}={acc}')
      if step in evals:
        logging.info('%s: step %d evaluated again (resumed run?): using the later line', where, step)
      evals[step] = (loss, acc)
  if not evals:
    raise RunError(f'{path}: no eval lines (split "eval"); train with config.eval_every > 0')
  return evals


def read_run(run_dir: str, *, tokens: str = 'all', name: Optional[str] = None) -> RunRecord:
  """One run directory as a :class:`RunRecord`; raises :class:`RunError` naming the file and the problem."""
  if tokens not in _METRIC_KEYS:
    raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")
  info = _read_run_info(run_dir)
  evals = _read_eval_lines(run_dir, tokens)
  steps = np.array(sorted(evals), dtype=np.int64)
  loss = np.array([evals[s][0] for s in steps], dtype=np.float64)
  err = np.array([1.0 - evals[s][1] / 100.0 for s in steps], dtype=np.float64)
  flops, gbs = float(info['train_flops_per_image']), int(info['global_batch_size'])
  compute = flops * gbs * steps.astype(np.float64)

  def opt_int(k):
    return None if info.get(k) is None else int(info[k])

  return RunRecord(
      name=name or os.path.basename(os.path.normpath(run_dir)), path=run_dir, n_params=int(info['n_params']),
      n_params_non_embedding=opt_int('n_params_non_embedding'), depth=opt_int('depth'),
      embed_dim=opt_int('embed_dim'), train_flops_per_image=flops, global_batch_size=gbs, step=int(steps[-1]),
      compute=float(compute[-1]), loss=float(loss[-1]), err=float(err[-1]),
      curve=EvalCurve(step=steps, compute=compute, loss=loss, err=err))


def collect_runs(dirs_or_globs, *, tokens: str = 'all', on_error: str = 'raise') -> List[RunRecord]:
  """Read run directories (paths or glob patterns such as ``'/tmp/sweep/*'``), sorted by parameter count.

  Args:
    dirs_or_globs: a path/pattern or a sequence of them. Files matched by a pattern are ignored (not runs).
    tokens: ``'all'``: loss/accuracy over all scales' tokens; ``'last'``: over the last scale's tokens.
    on_error: ``'raise'`` (default): the first unreadable run raises :class:`RunError` naming the directory or
      file:line and the reason; ``'warn'``: log a warning naming the run and the reason and leave it out.

  Returns:
    One :class:`RunRecord` per run. Names are the directories' base names (or their paths where two share one).
  """
  if on_error not in ('raise', 'warn'):
    raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
  dirs = _expand(dirs_or_globs)
  bases = [os.path.basename(d) for d in dirs]
  records = []
  for d, base in zip(dirs, bases):
    try:
      records.append(read_run(d, tokens=tokens, name=base if bases.count(base) == 1 else d))
    except RunError as e:
      if on_error == 'raise':
        raise
      logging.warning('skipping run %s: %s', d, e)
  if not records:
    raise RunError(f'no readable runs in {list(dirs)}')
  return sorted(records, key=lambda r: (r.n_params, r.name))


# ---------------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------------

def t_quantile(q: float, df: float) -> float:
  """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
  return float(stats.t.ppf(q, df))


@dataclasses.dataclass
class PowerLawFit:
  """``y = (beta * x)^alpha``, fitted in log-log space. ``alpha_ci``: the Student-t interval ``alpha +- t *
  stderr``; ``beta_ci``: ``exp(log beta +- t * se)`` with the delta-method standard error of ``log beta =
  intercept / alpha`` (approximate). With ``bootstrap > 0`` also percentile-bootstrap intervals (pairs resampled
  with replacement, ``numpy.random.default_rng(seed)``; crude with a handful of points)."""
  alpha: float
  beta: float
  alpha_stderr: float
  alpha_ci: Tuple[float, float]
  beta_ci: Tuple[float, float]
  level: float
  r2: float
  n: int
  resid_std: float                        # residual standard deviation of log y
  x_range: Tuple[float, float]
  bootstrap: int = 0
  seed: Optional[int] = None
  alpha_ci_bootstrap: Optional[Tuple[float, float]] = None
  beta_ci_bootstrap: Optional[Tuple[float, float]] = None

  def predict(self, x) -> np.ndarray:
    return (self.beta * np.asarray(x, np.float64)) ** self.alpha

  @property
  def alpha_halfwidth(self) -> float:
    return 0.5 * (self.alpha_ci[1] - self.alpha_ci[0])

  def to_dict(self) -> dict:
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

  def __str__(self) -> str:
    s = (f'alpha = {self.alpha:.4f} +- {self.alpha_halfwidth:.4f} ({self.level:.0%} CI [{self.alpha_ci[0]:.4f}, '
         f'{self.alpha_ci[1]:.4f}]), beta = {self.beta:.4g}, R^2 = {self.r2:.4f}, n = {self.n}')
    if self.alpha_ci_bootstrap is not None:
      s += f', bootstrap CI [{self.alpha_ci_bootstrap[0]:.4f}, {self.alpha_ci_bootstrap[1]:.4f}]'
    return s


def _ols(u: np.ndarray, v: np.ndarray):
  """v = a + b u: (a, b, residuals, Sxx)."""
  ub = u.mean()
  sxx = float(np.sum((u - ub) ** 2))
  b = float(np.sum((u - ub) * (v - v.mean())) / sxx)
  a = float(v.mean() - b * ub)
  return a, b, v - (a + b * u), sxx


def fit_power_law(x, y, *, level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> PowerLawFit:
  """Fit ``y = (beta * x)^alpha`` by least squares on ``log y = alpha * log beta + alpha * log x``.

  Args:
    x, y: the points (1-D, same length); all must be positive and finite, at least 3 of them, with >= 2
      distinct x.
    level: confidence level of the intervals (default 0.95).
    bootstrap: number of bootstrap resamples for the extra percentile intervals (0: none).
    seed: seed of ``numpy.random.default_rng`` for the bootstrap.

  Returns:
    A :class:`PowerLawFit`. ``alpha`` is negative for a loss that falls with x (the VAR paper's form).

  Raises:
    ValueError: too few points, non-positive or non-finite values, or all x equal.
  """
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f'x and y differ in length: {x.size} vs {y.size}')
  bad = ~(np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0))
  if bad.any():
    raise ValueError(f'a power-law fit needs positive finite x and y; bad points (x, y): '
                     f'{list(zip(x[bad].tolist(), y[bad].tolist()))[:5]}')
  if x.size < 3:
    raise ValueError(f'a power-law fit needs at least 3 points, got {x.size}')
  if np.unique(x).size < 2:
    raise ValueError(f'a power-law fit needs at least 2 distinct x values, got x = {x.tolist()}')
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), got {level}')
  n = x.size
  u, v = np.log(x), np.log(y)
  a, b, resid, sxx = _ols(u, v)
  df = n - 2
  s2 = float(np.sum(resid ** 2)) / df
  se_b = math.sqrt(s2 / sxx)
  ub = float(u.mean())
  var_a = s2 * (1.0 / n + ub * ub / sxx)
  cov_ab = -ub * s2 / sxx
  sst = float(np.sum((v - v.mean()) ** 2))
  r2 = 1.0 - float(np.sum(resid ** 2)) / sst if sst > 0 else float('nan')
  tq = t_quantile(0.5 + level / 2.0, df)
  alpha = b
  if alpha != 0.0:
    log_beta = a / alpha
    var_lb = var_a / b ** 2 + a * a * se_b ** 2 / b ** 4 - 2.0 * a * cov_ab / b ** 3   # delta method
    se_lb = math.sqrt(max(var_lb, 0.0))
    beta = math.exp(log_beta)
    beta_ci = (math.exp(log_beta - tq * se_lb), math.exp(log_beta + tq * se_lb))
  else:   # y does not change with x: no scale
    beta, beta_ci = float('nan'), (float('nan'), float('nan'))
  fit = PowerLawFit(alpha=alpha, beta=beta, alpha_stderr=se_b, alpha_ci=(alpha - tq * se_b, alpha + tq * se_b),
                    beta_ci=beta_ci, level=level, r2=r2, n=n, resid_std=math.sqrt(s2),
                    x_range=(float(x.min()), float(x.max())))
  if bootstrap > 0:
    rng = np.random.default_rng(seed)
    alphas, log_betas = [], []
    tries = 0
    while len(alphas) < bootstrap:
      tries += 1
      if tries > 20 * bootstrap + 100:
        raise ValueError(f'bootstrap: too few resamples with >= 2 distinct x ({len(alphas)} of {bootstrap})')
      idx = rng.integers(0, n, n)
      if np.unique(u[idx]).size < 2:
        continue
      ab, bb, _, _ = _ols(u[idx], v[idx])
      alphas.append(bb)
      log_betas.append(ab / bb if bb != 0 else np.nan)
    qs = [0.5 - level / 2.0, 0.5 + level / 2.0]
    lo, hi = np.quantile(alphas, qs)
    blo, bhi = np.exp(np.nanquantile(log_betas, qs))
    fit = dataclasses.replace(fit, bootstrap=int(bootstrap), seed=int(seed), alpha_ci_bootstrap=(float(lo), float(hi)),
                              beta_ci_bootstrap=(float(blo), float(bhi)))
  return fit


@dataclasses.dataclass
class Frontier:
  """The compute-efficient frontier: eval points, by increasing compute, each lower than every point with less
  or equal compute (across all runs)."""
  compute: np.ndarray
  value: np.ndarray
  step: np.ndarray
  run: List[str]

  def to_dict(self) -> dict:
    return {'compute': self.compute.tolist(), 'value': self.value.tolist(), 'step': self.step.tolist(),
            'run': list(self.run)}


def compute_frontier(records: Sequence[RunRecord], metric: str = 'loss') -> Frontier:
  """The Pareto frontier of (compute, ``metric``) over all runs' eval curves (``metric``: 'loss' or 'err').

  A point (C_i, y_i) is on it when ``y_i < min{y_j : C_j <= C_i, j != i}`` (ties at the same compute: the lower
  value; equal values: the one with less compute). The frontier's step function ``min{y_j : C_j <= C}`` is the
  best value reachable with at most C FLOPs by any of the runs."""
  if metric not in ('loss', 'err'):
    raise ValueError(f"metric must be 'loss' or 'err', got {metric!r}")
  pts = []
  for r in records:
    vals = getattr(r.curve, metric)
    for c, y, s in zip(r.curve.compute, vals, r.curve.step):
      pts.append((float(c), float(y), int(s), r.name))
  pts.sort(key=lambda p: (p[0], p[1]))
  keep, best = [], math.inf
  for p in pts:
    if p[1] < best:
      keep.append(p)
      best = p[1]
  return Frontier(compute=np.array([p[0] for p in keep]), value=np.array([p[1] for p in keep]),
                  step=np.array([p[2] for p in keep], dtype=np.int64), run=[p[3] for p in keep])


def fit_scaling(records: Sequence[RunRecord], *, param_key: str = 'n_params', level: float = 0.95,
                bootstrap: int = 0, seed: int = 0, strict: bool = True) -> Dict[str, PowerLawFit]:
  """The four fits of :data:`FIT_NAMES`: final test loss / error rate against N (one point per run) and against
  C (the compute frontier of all eval curves, :func:`compute_frontier`).

  With ``strict=False`` a fit that cannot be made (too few points) is left out with a warning naming it and why;
  otherwise the ``ValueError`` propagates, prefixed with the fit's name.
  """
  records = list(records)
  examples = {r.name: r.examples for r in records}
  if len(records) > 1 and max(examples.values()) > 1.01 * min(examples.values()):
    logging.warning('runs were evaluated after different numbers of training examples (%s): the fits against N '
                    'mix under- and fully-trained runs', examples)
  n = np.array([r.size(param_key) for r in records])
  data = {'loss_vs_N': (n, np.array([r.loss for r in records])),
          'err_vs_N': (n, np.array([r.err for r in records]))}
  for metric in ('loss', 'err'):
    fr = compute_frontier(records, metric)
    data[f'{metric}_vs_C'] = (fr.compute, fr.value)
  fits = {}
  for name in FIT_NAMES:
    x, y = data[name]
    try:
      fits[name] = fit_power_law(x, y, level=level, bootstrap=bootstrap, seed=seed)
    except ValueError as e:
      if strict:
        raise ValueError(f'{name}: {e}') from e
      logging.warning('no %s fit: %s', name, e)
  return fits


# ---------------------------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------------------------

_PANELS = (   # (fit name, record attribute, y label, uses compute)
    ('loss_vs_N', 'loss', 'test loss L', False),
    ('err_vs_N', 'err', 'token error rate Err', False),
    ('loss_vs_C', 'loss', 'test loss L', True),
    ('err_vs_C', 'err', 'token error rate Err', True),
)


def _fit_label(fit: PowerLawFit, sym: str, var: str) -> str:
  s = f'{sym} = ({fit.beta:.3g}·{var})^α\nα = {fit.alpha:.4f} ± {fit.alpha_halfwidth:.4f} ({fit.level:.0%} CI)'
  if fit.alpha_ci_bootstrap is not None:
    s += f'\nbootstrap [{fit.alpha_ci_bootstrap[0]:.4f}, {fit.alpha_ci_bootstrap[1]:.4f}]'
  return s + f', R² = {fit.r2:.3f}'


def _log_ticks(axis, lim):
  """Readable log-axis labels: 1-2-5 per decade (1..9 on an axis spanning less than a decade), no minor labels."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  subs = (1.0, 2.0, 5.0) if lim[1] / lim[0] >= 10 else tuple(float(i) for i in range(1, 10))
  axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:.3g}'))
  axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(float(i) for i in range(1, 10))))
  axis.set_minor_formatter(ticker.NullFormatter())


def plot_scaling(records: Sequence[RunRecord], fits: Mapping[str, PowerLawFit], out_png: str, *,
                 param_key: str = 'n_params', title: Optional[str] = None) -> str:
  """Write a PNG of four log-log panels: test loss and error rate against N (final evals) and against C (every
  run's eval curve, the frontier points circled), each with its fitted line (from ``fits``, keyed as
  :data:`FIT_NAMES`; a missing fit is just not drawn) and a legend with alpha and its confidence interval.

  Needs matplotlib (imported here, Agg canvas, no pyplot state). Returns ``out_png``.
  """
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('plot_scaling needs matplotlib: pip install matplotlib (or pip install -e ".[eval]")') from e
  records = list(records)
  fig = Figure(figsize=(13, 10), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 2).ravel()
  colors = [f'C{i % 10}' for i in range(len(records))]
  nlabel = 'non-embedding parameters N' if param_key == 'n_params_non_embedding' else 'parameters N'
  for ax, (fit_name, attr, ylabel, vs_c) in zip(axes, _PANELS):
    sym = 'L' if attr == 'loss' else 'Err'
    if vs_c:
      for r, col in zip(records, colors):
        ax.plot(r.curve.compute, getattr(r.curve, attr), '.-', color=col, alpha=0.6, lw=1, label=r.name)
      fr = compute_frontier(records, attr)
      ax.scatter(fr.compute, fr.value, s=80, facecolors='none', edgecolors='k', zorder=3, label='frontier')
      xs = fr.compute
      ax.set_xlabel('training compute C (FLOPs)')
    else:
      xs = np.array([r.size(param_key) for r in records])
      for x, r, col in zip(xs, records, colors):
        ax.scatter([x], [getattr(r, attr)], color=col, s=40, zorder=3, label=r.name)
      ax.set_xlabel(nlabel)
    fit = fits.get(fit_name)
    if fit is not None and len(xs):
      lo, hi = float(np.min(xs)), float(np.max(xs))
      grid = np.geomspace(lo / 1.3, hi * 1.3, 100)
      ax.plot(grid, fit.predict(grid), 'k--', lw=1.5, label=_fit_label(fit, sym, 'C' if vs_c else 'N'))
    ax.set_xscale('log')
    ax.set_yscale('log')
    _log_ticks(ax.xaxis, ax.get_xlim())
    _log_ticks(ax.yaxis, ax.get_ylim())
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
    ax.set_title(f'{sym} vs {"C (compute frontier)" if vs_c else "N (final eval)"}')
    ax.legend(fontsize=7, loc='best')
  fig.suptitle(title or f'VAR scaling: {len(records)} runs')
  fileio.makedirs(os.path.dirname(fileio.abspath(out_png)))
  fileio.atomic_save(out_png, lambda f: fig.savefig(f, dpi=110, format=os.path.splitext(out_png)[1][1:] or 'png'))
  return out_png


# ---------------------------------------------------------------------------------------------------------------
# reports and the command line
# ---------------------------------------------------------------------------------------------------------------

def format_runs_table(records: Sequence[RunRecord]) -> str:
  head = (f'{"run":<16} {"depth":>5} {"N":>10} {"N non-emb":>10} {"step":>6} {"C (FLOPs)":>10} {"PF-days":>10} '
          f'{"loss":>8} {"err":>7}')
  lines = [head, '-' * len(head)]
  for r in records:
    lines.append(f'{r.name:<16.16} {"-" if r.depth is None else r.depth:>5} {r.n_params:>10,d} '
                 f'{"-" if r.n_params_non_embedding is None else format(r.n_params_non_embedding, ",d"):>10} '
                 f'{r.step:>6d} {r.compute:>10.3e} {r.pf_days:>10.3e} {r.loss:>8.4f} {r.err:>7.4f}')
  return '\n'.join(lines)


def format_fits_table(fits: Mapping[str, PowerLawFit]) -> str:
  boot = any(f.alpha_ci_bootstrap is not None for f in fits.values())
  level = next(iter(fits.values())).level if fits else 0.95
  head = (f'{"fit":<10} {"n":>3} {"alpha":>9} {"stderr":>8} {f"{level:.0%} CI (t)":>22} {"beta":>10} '
          f'{"R^2":>7}' + (f' {"bootstrap CI":>22}' if boot else ''))
  lines = [head, '-' * len(head)]
  for name in FIT_NAMES:
    if name not in fits:
      lines.append(f'{name:<10} (not fitted)')
      continue
    f = fits[name]
    ci = f'[{f.alpha_ci[0]:.4f}, {f.alpha_ci[1]:.4f}]'
    line = f'{name:<10} {f.n:>3d} {f.alpha:>9.4f} {f.alpha_stderr:>8.4f} {ci:>22} {f.beta:>10.3e} {f.r2:>7.4f}'
    if boot and f.alpha_ci_bootstrap is not None:
      line += f' {"[%.4f, %.4f]" % f.alpha_ci_bootstrap:>22}'
    lines.append(line)
  return '\n'.join(lines)


def run(runs, *, out: Optional[str] = None, json_path: Optional[str] = None, param_key: str = 'n_params',
        tokens: str = 'all', level: float = 0.95, bootstrap: int = 0, seed: int = 0, skip_bad: bool = False,
        stream=None) -> Tuple[List[RunRecord], Dict[str, PowerLawFit]]:
  """What the command line does: collect, fit (what can be fitted), print both tables, write the PNG / JSON."""
  stream = stream or sys.stdout
  records = collect_runs(runs, tokens=tokens, on_error='warn' if skip_bad else 'raise')
  fits = fit_scaling(records, param_key=param_key, level=level, bootstrap=bootstrap, seed=seed, strict=False)
  over = "all scales'" if tokens == 'all' else "the last scale's"
  print(f'{len(records)} runs (loss/err over {over} tokens; '
        f'C = train FLOPs per image x batch x step):', file=stream)
  print(format_runs_table(records), file=stream)
  print(f'\npower laws y = (beta * x)^alpha, least squares in log-log space (N = {param_key}; C fits: the '
        f'compute frontier):', file=stream)
  print(format_fits_table(fits), file=stream)
  if json_path:
    payload = {'settings': {'param_key': param_key, 'tokens': tokens, 'level': level, 'bootstrap': bootstrap,
                            'seed': seed},
               'runs': [r.to_dict() for r in records],
               'fits': {k: v.to_dict() for k, v in fits.items()},
               'frontier': {m: compute_frontier(records, m).to_dict() for m in ('loss', 'err')}}
    fileio.makedirs(os.path.dirname(fileio.abspath(json_path)))
    fileio.atomic_write_text(json_path, json.dumps(payload, indent=1))
    print(f'wrote {json_path}', file=stream)
  if out:
    plot_scaling(records, fits, out, param_key=param_key)
    print(f'wrote {out}', file=stream)
  return records, fits
