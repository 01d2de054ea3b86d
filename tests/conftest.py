"""Test setup: 8 fake CPU devices and full-precision matmuls, fixed before JAX initialises its backends."""
import json
import os
import pathlib

import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('VAR_JAX_SHARED', REPO.parent / 'shared'))
VAR_FIXTURES = SHARED / 'fixtures' / 'var_reference'
FIXTURE_MODELS = ('tiny', 'tiny_saln')


def fixture_dir(name: str) -> pathlib.Path:
  d = VAR_FIXTURES / name
  if not d.is_dir():
    raise FileNotFoundError(f'reference fixtures not found at {d}: the tests expect ../shared beside the repo '
                            f'(or VAR_JAX_SHARED pointing at it)')
  return d


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope='session', params=FIXTURE_MODELS)
def reference_model(request):
  """(name, pipeline loaded from the fixture .pth files, io.npz arrays, config.json)."""
  from var_jax import VARPipeline
  d = fixture_dir(request.param)
  pipe = VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')
  io = dict(np.load(d / 'io.npz'))
  cfg = json.loads((d / 'config.json').read_text())
  return request.param, pipe, io, cfg
