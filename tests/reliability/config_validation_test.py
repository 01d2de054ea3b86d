"""One validation of the whole training config before any work (issue 24, ``var_jax.train.validate``): every leaf of
every task's config against the rule table, and the relations between fields; each failure one ``ConfigError``
line naming the key, the value and what is allowed. The bad values are generated from the table itself (each
rule's own boundary: below its lowest, above its highest, NaN / inf, an unknown name), so a field added to a config
is covered by the row it matches."""
import copy
import functools
import math
import time

import pytest

import tests_helpers


@functools.lru_cache(maxsize=None)
def _loaded(name):
  return tests_helpers.load_config(name)


def load_config(name):
  return copy.deepcopy(_loaded(name))
from var_jax.train import errors, loop, validate

CONFIGS = ('quickstart', 'vqvae_quickstart', 'bae_quickstart', 'elm_quickstart', 'elm_mlm_quickstart',
           'bigr_quickstart')


def _bad_values(rule, current):
  """Values ``rule`` refuses, of a type the field accepts (ml_collections keeps a field's type)."""
  if isinstance(rule, validate.Said):
    return _bad_values(rule.rule, current)
  if isinstance(rule, validate.Num):
    integer = isinstance(current, int) and not isinstance(current, bool)
    out = []
    if rule.lo is not None:
      out.append(rule.lo if rule.open_lo else rule.lo - 1)
    if rule.hi is not None:
      out.append(rule.hi if rule.open_hi else rule.hi + 1)
    if not integer:
      out += [math.nan, math.inf]
    out = [int(v) if integer and not (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in out]
    return [v for v in out if v not in rule.also and (not integer or isinstance(v, int))]
  if isinstance(rule, validate.OneOf):
    return ['no_such_' + str(current)] if isinstance(current, str) else []
  if isinstance(rule, validate.Schedule):
    return ['no_such_schedule']
  if isinstance(rule, validate.Ints):
    out = [(rule.lo - 1,)]
    if rule.increasing:
      out.append((2, 1))
    return out
  return []


def _cases():
  out = []
  for name in CONFIGS:
    c = load_config(name)
    for key, v in validate._leaves(c):
      pattern, rule = validate.rule_for(key)
      if rule is None or v is None or not validate._governs(rule, v):
        continue
      for bad in _bad_values(rule, v):
        out.append((name, key, bad))
  return out


CASES = _cases()


def _set(c, key, value):
  *path, last = key.split('.')
  for p in path:
    c = c[p]
  c[last] = value


def _error(c) -> str:
  with pytest.raises(errors.ConfigError) as e:
    validate.validate(c)
  msg = str(e.value)
  assert '\n' not in msg, msg
  return msg


def test_the_table_covers_every_numeric_field():
  """Every numeric / enum leaf of every task's config meets a rule more specific than 'finite' (or a deliberate
  one), and the generated cases span the tasks."""
  for name in CONFIGS:
    for key, v in validate._leaves(load_config(name)):
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        assert validate.rule_for(key)[0] != '*', f'{name}: config.{key} has no rule of its own'
  assert len(CASES) > 300 and {n for n, _, _ in CASES} == set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_validates(name):
  validate.validate(load_config(name))


@pytest.mark.parametrize('name', CONFIGS)
def test_each_bad_value_is_one_line_naming_key_value_and_what_is_allowed(name):
  n = 0
  for cname, key, bad in CASES:
    if cname != name:
      continue
    c = load_config(name)
    _set(c, key, bad)
    msg = _error(c)
    assert msg.startswith(f'config.{key}={bad!r}: '), (key, bad, msg)
    assert len(msg) > len(f'config.{key}={bad!r}: ') + 5, msg          # says what is allowed
    n += 1
  assert n > 20


# relations: (config, {key: value}, the key the message names)
RELATIONS = [
    ('quickstart', {'global_batch_size': 12}, 'global_batch_size'),          # 8 devices
    ('quickstart', {'grad_accum': 3}, 'global_batch_size'),
    ('quickstart', {'model.embed_dim': 129}, 'model.embed_dim'),              # vs num_heads=2
    ('quickstart', {'sample_classes': (0, 20)}, 'sample_classes'),           # 10 classes
    ('quickstart', {'sample_classes': (10,)}, 'sample_classes'),
    ('quickstart', {'total_steps': -1, 'epochs': 0.0}, 'epochs'),
    ('quickstart', {'data.name': 'folder'}, 'data.path'),
    ('quickstart', {'data.name': 'tfds'}, 'data.tfds_name'),
    ('quickstart', {'model.patch_nums': (1, 2, 3, 5)}, 'patch_nums'),
    ('quickstart', {'data.image_size': 64}, 'data.image_size'),
    ('quickstart', {'model.vocab_size': 128}, 'vocab_size'),
    ('quickstart', {'progressive.fraction': 0.5, 'progressive.start_stage': 4}, 'progressive.start_stage'),
    ('quickstart', {'mesh.tensor': 3}, 'mesh'),
    ('quickstart', {'quality_per_class': 5, 'data.name': 'folder', 'data.path': '/x'}, 'quality_per_class'),
    ('vqvae_quickstart', {'grad_accum': 2}, 'grad_accum'),
    ('vqvae_quickstart', {'data.image_size': 64}, 'data.image_size'),
    ('vqvae_quickstart', {'data.token_cache': '/x'}, 'data.token_cache'),
    ('elm_quickstart', {'model.dim': 130}, 'model.dim'),
    ('elm_quickstart', {'sample_classes': (3, 10)}, 'sample_classes'),
    ('elm_quickstart', {'model.token_each': 3}, 'bae.codebook_size'),
    ('bigr_quickstart', {'data.image_size': 64}, 'data.image_size'),
]


@pytest.mark.parametrize('name,changes,key', RELATIONS, ids=[f'{n}-{k}' for n, _, k in RELATIONS])
def test_relations_are_one_line_naming_the_key(name, changes, key):
  c = load_config(name)
  for k, v in changes.items():
    _set(c, k, v)
  msg = _error(c)
  assert key in msg, msg


@pytest.mark.parametrize('key,value', [('model.depth', 0), ('model.depth', -2), ('optim.base_lr', -1.0),
                                       ('optim.base_lr', math.nan), ('log_every', 0), ('sample_classes', (20,))])
def test_training_refuses_before_any_work(tmp_path, key, value):
  """loop.train: the error comes before the lock, the workdir, the data or a compile (fast, nothing written)."""
  c = load_config('quickstart')
  _set(c, key, value)
  t = time.time()
  with pytest.raises(errors.ConfigError, match=f'^config.{key}='):
    loop.train(c, str(tmp_path / 'wd'))
  assert time.time() - t < 5
  assert not (tmp_path / 'wd').exists()


def test_a_multi_stage_config_checks_every_stage_before_the_first_trains(tmp_path):
  import importlib.util
  from tests_helpers import REPO
  from var_jax.train import stages
  spec = importlib.util.spec_from_file_location('cfg_digits', REPO / 'configs' / 'digits.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('var')
  c.stages.var.model.depth = 0                       # the second stage: refused before the tokenizer trains
  with pytest.raises(errors.ConfigError, match=r'^config.stages.var.model.depth=0: expected an integer >= 1$'):
    stages.run(c, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()
