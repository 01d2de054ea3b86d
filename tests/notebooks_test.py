"""Runs the notebooks headless, top to bottom, on the tiny reference fixtures.

The parameters are overridden papermill-style: a cell injected right after the one tagged ``parameters``. The kernel
runs on CPU with this checkout first on its path, in a temporary working directory (where the PNGs land).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbformat  # noqa: E402
import nbclient  # noqa: E402

from conftest import REPO, fixture_dir  # noqa: E402

NOTEBOOKS = REPO / 'notebooks'
KERNEL = 'python3'
CELL_TIMEOUT_S = 300

pytestmark = [pytest.mark.notebook, pytest.mark.slow]   # ~1 min: in CI's second (slow) pass


@pytest.fixture(scope='session')
def kernel_name():
  """A ``python3`` kernelspec, installed for this user if jupyter finds none."""
  from jupyter_client.kernelspec import KernelSpecManager
  if KERNEL not in KernelSpecManager().find_kernel_specs():
    subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--user', '--name', KERNEL], check=True)
  return KERNEL


def tiny_checkpoints():
  d = fixture_dir('tiny')
  return {'VAE_CKPT': str((d / 'vae.pth').resolve()), 'VAR_CKPT': str((d / 'var.pth').resolve())}


def inject_parameters(nb, params):
  """Insert a cell setting ``params`` right after the ``parameters``-tagged cell (as papermill does)."""
  idx = [i for i, c in enumerate(nb.cells) if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(idx) == 1, f'expected exactly one cell tagged "parameters", found {len(idx)}'
  src = '# Injected parameters\n' + '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src)
  cell.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(idx[0] + 1, cell)
  return nb


def run_notebook(name, params, workdir: Path, kernel: str, env_extra=None):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  inject_parameters(nb, params)
  env = dict(os.environ, **(env_extra or {}))
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                                   resources={'metadata': {'path': str(workdir)}})
  client.execute(env=env)   # raises CellExecutionError on the first failing cell
  return nb


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
  """A local hub cache holding the fixtures under released names, read offline: (environment, {name: model_args})."""
  import hub_cache
  cache = tmp_path_factory.mktemp('hub')
  args = hub_cache.fixture_cache(cache)
  return {'HF_HUB_CACHE': str(cache), 'HF_HUB_OFFLINE': '1'}, args


def outputs_text(nb):
  out = []
  for c in nb.cells:
    for o in c.get('outputs', []):
      if o.get('output_type') == 'stream':
        out.append(o.get('text', ''))
  return ''.join(out)


@pytest.mark.parametrize('name', ['sampling.ipynb', 'zero_shot_edit.ipynb', 'elm_sampling.ipynb'])
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for c in nb.cells:
    if c.cell_type == 'code':
      assert c.outputs == [] and c.execution_count is None, f'{name}: outputs stored in cell {c.get("id")}'
  tagged = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(tagged) == 1


def test_notebooks_share_one_helper_module():
  """No notebook re-defines what var_jax.notebook holds, or downloads by hand."""
  for name in ('sampling.ipynb', 'zero_shot_edit.ipynb', 'elm_sampling.ipynb'):
    src = '\n'.join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == 'code')
    assert 'from var_jax import notebook as nb' in src and 'nb.load(' in src, name
    for banned in ('def make_grid', 'def to_pil', 'def load_image', 'urllib', 'urlretrieve', 'huggingface.co'):
      assert banned not in src, (name, banned)


@pytest.mark.parametrize('weights', ['files', 'pretrained'])
def test_sampling_notebook(tmp_path, kernel_name, hub, weights):
  params = dict(CLASSES=[1, 3, 5, 7], SAMPLES_PER_CLASS=1, BATCH_SIZE=4, NUM_TIMED=8, OUTPUT_PNG='grid.png')
  params.update(tiny_checkpoints() if weights == 'files' else {'PRETRAINED': 'var_d16'})
  nb = run_notebook('sampling.ipynb', params, tmp_path, kernel_name, hub[0] if weights == 'pretrained' else None)
  png = tmp_path / 'grid.png'
  assert png.is_file()
  from PIL import Image
  with Image.open(png) as im:
    assert im.size == (4 * (64 + 2) + 2, 64 + 2 + 2)
  assert 'images/s' in outputs_text(nb)


@pytest.mark.parametrize('source', ['sampled', 'image_path'])
def test_zero_shot_edit_notebook(tmp_path, kernel_name, source):
  from PIL import Image
  params = dict(tiny_checkpoints(), SOURCE_CLASS=1, EDIT_CLASS=3, NUM_VARIANTS=2, SEED=1, OUTPUT_PNG='edits.png')
  if source == 'image_path':   # a user's image: not square, not the model's size
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(tmp_path / 'input.png')
    params['IMAGE_PATH'] = str(tmp_path / 'input.png')
  nb = run_notebook('zero_shot_edit.ipynb', params, tmp_path, kernel_name)
  png = tmp_path / 'edits.png'
  assert png.is_file()
  with Image.open(png) as im:
    assert im.size == (4 * (64 + 2) + 2, 3 * (64 + 2) + 2)   # 3 edits x (input, kept part, 2 variants)
  assert 'input (64, 64, 3)' in outputs_text(nb)


@pytest.mark.parametrize('fixture', ['elm_ar_2x4', 'elm_mlm_1x8', 'pretrained'])
def test_elm_sampling_notebook(tmp_path, kernel_name, hub, fixture):
  import json
  from conftest import SHARED
  d = SHARED / 'fixtures' / 'elm_bigr_reference'
  params = dict(CLASSES=[1, 3, 5], SAMPLES_PER_CLASS=1, BATCH_SIZE=4, NUM_TIMED=4, TOP_K=5, NUM_ITER=4,
                OUTPUT_PNG='elm.png')
  if fixture == 'pretrained':          # the AR 2x4 fixture as the release L-2-10 (+ its BAE) in the hub cache
    params.update(PRETRAINED='L-2-10', MODEL_ARGS=hub[1]['L-2-10'])
  else:
    margs = json.loads((d / fixture / 'config.json').read_text())['model_args']
    params.update(BAE_CKPT=str((d / 'bae_k8' / 'binaryae.th').resolve()),
                  MODEL_CKPT=str((d / fixture / 'model.pth').resolve()), MODEL_ARGS=margs)
  nb = run_notebook('elm_sampling.ipynb', params, tmp_path, kernel_name, hub[0] if fixture == 'pretrained' else None)
  from PIL import Image
  with Image.open(tmp_path / 'elm.png') as im:
    assert im.size == (3 * (64 + 2) + 2, 64 + 2 + 2)
  text = outputs_text(nb)
  assert 'images/s' in text and ('mlm' in text.lower()) == ('mlm' in fixture)
