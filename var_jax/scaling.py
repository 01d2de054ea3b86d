r"""Scaling laws of VAR runs: collect, fit and plot final test loss / error rate against model size and compute.

  python -m var_jax.scaling --runs='/tmp/var_scaling/d*' --out=/tmp/var_scaling/scaling.png --json=fits.json

The library (collecting runs, the fits, the plot): ``var_jax.eval.scaling``.
"""
from __future__ import annotations

from absl import flags

from var_jax import cli
from var_jax.eval import scaling

def define_flags():
  """Which runs, what to fit against, and where the plot and JSON go."""
  flags.DEFINE_enum('params', 'n_params', list(scaling.PARAM_KEYS), 'parameter count to fit against')
  flags.DEFINE_list('runs', None, 'run directories or glob patterns (comma-separated), e.g. "/tmp/sweep/*"')
  flags.DEFINE_string('out', None, 'write the four-panel log-log plot here (PNG; needs matplotlib)')
  flags.DEFINE_string('json', None, 'write runs, fits and frontiers here (JSON)')
  flags.DEFINE_enum('tokens', 'all', ['all', 'last'], 'loss/error over all scales\' tokens or the last scale\'s')
  flags.DEFINE_float('level', 0.95, 'confidence level of the intervals')
  flags.DEFINE_integer('bootstrap', 0, 'bootstrap resamples for extra percentile intervals (0: off)')
  flags.DEFINE_bool('skip_bad', False, 'leave out unreadable runs with a warning instead of failing')
  flags.DEFINE_integer('seed', 0, 'bootstrap seed')
  flags.mark_flag_as_required('runs')


def main():
  f = cli.FLAGS
  scaling.run(f.runs, out=f.out, json_path=f.json, param_key=f.params, tokens=f.tokens, level=f.level,
              bootstrap=f.bootstrap, seed=f.seed, skip_bad=f.skip_bad)


if __name__ == '__main__':
  define_flags()
  cli.run(main, errors=(scaling.RunError,))
