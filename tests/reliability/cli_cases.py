"""Run bad command lines of a var_jax CLI (``cli_driver.py``, one subprocess for a whole list) and check that each
fails the way issue 15 asks: exit status 1, one ``error:`` line naming the problem, no traceback."""
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, List, Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]
DRIVER = pathlib.Path(__file__).with_name('cli_driver.py')


def run_cli_cases(cases: Sequence[Sequence[str]], tmp_path, timeout: int = 600) -> List[Dict]:
  """Each case [module, arg, ...] (e.g. ['var_jax.sample', '--cfg=inf', ...]), all in one subprocess."""
  spec = pathlib.Path(tmp_path) / 'cli_cases.json'
  spec.write_text(json.dumps([list(c) for c in cases]))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, str(DRIVER), str(spec)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def error_line(result: Dict) -> str:
  """The one ``error:`` line of a failed run (asserting exit 1, no traceback, exactly one such line)."""
  assert not result['traceback'], result['stderr']
  assert result['code'] == 1, result
  lines = [l for l in result['stderr'].splitlines() if l.startswith('error:')]
  assert len(lines) == 1, result['stderr']
  return lines[0]
