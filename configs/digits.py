r"""The main job: a tokenizer, then a generator on its codes, on scikit-learn's bundled digits, in one command.

  python -m var_jax.train --config=configs/digits.py --workdir=/tmp/digits          # VAR (VQVAE, then VAR)
  python -m var_jax.train --config=configs/digits.py:elm --workdir=/tmp/digits_elm  # ELM (BAE, then ELM AR)
  python -m var_jax.train --config=configs/digits.py:bigr --workdir=/tmp/digits_bigr

Each stage trains in ``<workdir>/<stage>`` (``tokenizer``, then ``var`` / ``elm`` / ``bigr``) with its own config
(``configs/vqvae_quickstart.py`` + ``configs/quickstart.py``, or ``configs/bae_quickstart.py`` +
``configs/elm_quickstart.py`` / ``configs/bigr_quickstart.py``); the generator reads the tokenizer's export through
``{tokenizer}``. At the end, ``final.per_class`` samples per class from the exported model at the stage's ``sample``
settings: ``<workdir>/samples.png`` (a row per class) and the digits quality score (``var_jax.eval.digits``),
printed and in ``<workdir>/quality.json``. Rerunning resumes; finished stages are skipped (``var_jax.train.stages``).
Every value is overridable per stage: ``--config.stages.var.epochs=20 --config.stages.tokenizer.epochs=4``.
"""
import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
  spec = importlib.util.spec_from_file_location(f'var_jax_configs_{name}', os.path.join(_HERE, f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)   # configs are loaded by path (--config=configs/x.py), not as a package
  return mod


# family: (tokenizer config, generator config, the tokenizer export the generator reads, the config key naming it)
FAMILIES = {
    'var': ('vqvae_quickstart', 'quickstart', 'vqvae.safetensors', 'vae_ckpt'),
    'elm': ('bae_quickstart', 'elm_quickstart', 'binaryae_ema.safetensors', 'bae_ckpt'),
    'bigr': ('bae_quickstart', 'bigr_quickstart', 'binaryae_ema.safetensors', 'bae_ckpt'),
}


def get_config(family='var'):
  family = family or 'var'
  if family not in FAMILIES:
    raise ValueError(f'configs/digits.py:<family>: family must be one of {sorted(FAMILIES)}, got {family!r}')
  tok_name, gen_name, export, key = FAMILIES[family]
  c = ml_collections.ConfigDict()
  c.stage_order = ('tokenizer', family)
  c.stages = ml_collections.ConfigDict()
  c.stages.tokenizer = _load(tok_name).get_config()
  gen = _load(gen_name).get_config()
  gen[key] = '{tokenizer}/' + export
  gen.quality_per_class = 50     # the digits quality score at every sample_every step (metrics.jsonl, TensorBoard)
  if family != 'var':
    gen.sample_every = 500       # VAR's is in configs/quickstart.py
  c.stages[family] = gen
  # the end of the run: the digits quality score of per_class samples of each class, a grid of grid_per_class each
  c.final = ml_collections.ConfigDict(dict(per_class=50, grid_per_class=10))
  return c
