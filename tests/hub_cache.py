"""A local directory laid out like the Hugging Face hub cache (``models--{org}--{repo}/snapshots/<commit>/<file>``
with ``refs/main``), holding the reference fixtures under released file names: what ``hf_hub_download`` reads with
``HF_HUB_OFFLINE=1``."""
import json
import os
import pathlib
import shutil

from conftest import SHARED, fixture_dir

COMMIT = '0123456789abcdef0123456789abcdef01234567'
ELM_BIGR = SHARED / 'fixtures' / 'elm_bigr_reference'


def add_file(cache: pathlib.Path, repo: str, file: str, source, commit: str = COMMIT, ref: str = 'main'):
  """Put ``source`` (a path, copied, or bytes) at ``file`` of ``repo``'s snapshot ``commit``; ``refs/<ref>`` -> it."""
  root = cache / ('models--' + repo.replace('/', '--'))
  dst = root / 'snapshots' / commit / file
  dst.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(source, bytes):
    dst.write_bytes(source)
  else:
    shutil.copyfile(source, dst)
  (root / 'refs').mkdir(parents=True, exist_ok=True)
  (root / 'refs' / ref).write_text(commit)
  return dst


def fixture_cache(cache: pathlib.Path):
  """The tiny fixtures as released files: var_d16 (+ its VQVAE), L-2-10 (the ELM AR 2x4 fixture + bae_k8 as bae_20),
  mlmL-1-16 (ELM MLM 1x8), bigr_L_d24 (+ bae_d24). Returns {name: the fixture's model_args} (the tiny sizes the
  table's ModelArgs do not describe)."""
  from var_jax import hub
  tiny = fixture_dir('tiny')
  bae = ELM_BIGR / 'bae_k8' / 'binaryae.th'
  placed = {'var_d16': (tiny / 'var.pth', tiny / 'vae.pth', None),
            'L-2-10': (ELM_BIGR / 'elm_ar_2x4' / 'model.pth', bae, 'elm_ar_2x4'),
            'mlmL-1-16': (ELM_BIGR / 'elm_mlm_1x8' / 'model.pth', bae, 'elm_mlm_1x8'),
            'bigr_L_d24': (ELM_BIGR / 'bigr_k8' / 'bigr.pt', bae, 'bigr_k8')}
  args = {}
  for name, (model, tok, fix) in placed.items():
    r = hub.RELEASES[name]
    t = hub.RELEASES[r.tokenizer]
    add_file(cache, r.repo, r.file, model)
    add_file(cache, t.repo, t.file, tok)
    args[name] = json.loads((ELM_BIGR / fix / 'config.json').read_text())['model_args'] if fix else {}
  return args


def offline_env(cache: pathlib.Path, **extra):
  """The environment of a process that reads ``cache`` and never touches the network."""
  return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', **extra)
