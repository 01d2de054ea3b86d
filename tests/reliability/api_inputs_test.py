"""Issue 24, API inputs: every pipeline method that takes images, token ids, bits, labels or a mask
(``encode``, ``reconstruct``, ``decode``, ``logits``, ``features``, ``tokenize``, ``edit``, ...) validates them
through the validators ``sample`` / ``edit`` use (``pipelines.base.check_images``; ``sampling.common``'s
``check_token_ids``, ``check_mask`` and label rule): a uint8 0..255 array where float [0, 1] / [-1, 1] is meant,
values out of range, NaN/inf, token ids outside the vocabulary, non-0/1 bits, 2-D or out-of-range labels and NaN
masks are each one ValueError naming the input, before any network runs."""

import numpy as np
import pytest

from tests_helpers import fixture_pipelines




@pytest.fixture(scope='module')
def pipes():
  return fixture_pipelines()


def _images(p, kind):
  s = p.vae_config.image_size if p.family == 'var' else p.image_size
  x = np.zeros((2, s, s, 3), np.float32)
  if kind == 'uint8':
    return np.full(x.shape, 200, np.uint8)
  if kind == '0..255':
    return x + 255.0
  x[1, 0, 0, 0] = {'nan': np.nan, 'inf': np.inf}[kind]
  return x


def _tokens(p, kind):
  if p.family == 'var':
    t, v = np.zeros((2, p.var_config.seq_len), np.int64), p.var_config.vocab_size
  else:
    t, v = np.zeros((2, p.seq_len, p.token_each), np.int64), p.codebook_size
  t[1, -1] = {'vocab': v, 'negative': -1}[kind] if kind != 'half' else 0
  return t.astype(np.float32) + 0.5 if kind == 'half' else t


def _bits(p, value):
  b = np.zeros((2, p.latent_size, p.latent_size, p.bits_per_cell), np.float32)
  b[0, 0, 0, 0] = value
  return b


IMAGE_KINDS = {'uint8': 'must be floating-point in {r}, got uint8 (e.g. [0, 255] images: {hint})',
               '0..255': 'must be in {r}, got min 255 max 255 (e.g. [0, 255] images: {hint})',
               'nan': 'hold 1 NaN/inf values', 'inf': 'hold 1 NaN/inf values'}
IMAGE_METHODS = {'var': ('encode', 'reconstruct', 'encode_features', 'fhats', 'edit'),
                 'elm': ('encode', 'tokenize'), 'bigr': ('encode', 'features')}
CASES = [(f, m, f'images:{k}') for f, ms in IMAGE_METHODS.items() for m in ms for k in IMAGE_KINDS]
CASES += [(f, m, f'tokens:{k}') for f, ms in (('var', ('decode', 'logits', 'var_input')),
                                             ('elm', ('decode_tokens', 'logits', 'tokens_to_bits')))
          for m in ms for k in ('vocab', 'negative', 'half')]
CASES += [(f, m, f'bits:{v}') for f, ms in (('elm', ('decode', 'bits_to_tokens')), ('bigr', ('decode', 'features')))
          for m in ms for v in ('2', 'nan', '0.5')]
CASES += [(f, m, f'labels:{k}') for f, m in (('var', 'logits'), ('elm', 'logits'), ('bigr', 'features'),
                                             ('var', 'edit'), ('var', 'sample'), ('elm', 'sample'))
          for k in ('2d', 'range', 'float')]
CASES += [('var', 'edit', 'mask:nan'), ('var', 'edit', 'mask:2'), ('elm', 'logits', 'token_all_mask:mlm_on_ar')]


def _call(p, method, arg):
  """``method`` of ``p`` with ``arg`` as the input under test (its other inputs valid)."""
  what, kind = arg.split(':')
  good_img = np.nan_to_num(_images(p, 'nan'))
  if p.family == 'var':
    good_tok = np.zeros((2, p.var_config.seq_len), np.int32)
    good_mask = np.ones(good_img.shape[1:3], np.float32)
  else:
    good_tok = np.zeros((2, p.seq_len, p.token_each), np.int32) if p.family == 'elm' else None
  labels = [0, 1]
  if what == 'images':
    x = _images(p, kind)
    if method == 'edit':
      return p.edit(x, good_mask, labels, 0)
    return getattr(p, method)(x)
  if what == 'tokens':
    t = _tokens(p, kind)
    return p.logits(labels, t) if method == 'logits' else getattr(p, method)(t)
  if what == 'bits':
    b = _bits(p, float(kind))
    if method == 'features':          # 4-D float arrays are images there: bits as (B, N, K)
      b = b.reshape(b.shape[0], -1, b.shape[-1])
    return getattr(p, method)(b)
  if what == 'labels':
    bad = {'2d': np.array([[0, 1], [1, 0]]), 'range': [0, p.num_classes + 1], 'float': [0.5, 1.0]}[kind]
    if method == 'logits':
      return p.logits(bad, good_tok)
    if method == 'features':
      return p.features(good_img, label=bad)
    if method == 'edit':
      return p.edit(good_img, good_mask, bad, 0)
    return p.sample(bad, 0, num_samples=None, top_k=1) if p.family == 'var' else p.sample(bad, 0, top_k=1)
  if what == 'mask':
    m = good_mask.copy()
    m[0, 0] = float(kind)
    return p.edit(good_img, m, labels, 0)
  return p.logits(labels, good_tok, token_all_mask=np.zeros((2, p.seq_len)))


def _expected(p, method, arg):
  what, kind = arg.split(':')
  if what == 'images':
    r, hint = ('[-1, 1]', 'x / 127.5 - 1') if p.family == 'var' else ('[0, 1]', 'x / 255')
    return 'images ' + IMAGE_KINDS[kind].format(r=r, hint=hint)
  if what == 'tokens':
    v = p.var_config.vocab_size if p.family == 'var' else p.codebook_size
    return {'vocab': f'must lie in [0, {v}), got [0, {v}]', 'negative': f'must lie in [0, {v}), got [-1, 0]',
            'half': 'must be integer' if p.family == 'elm' else f'must be integer ids in [0, {v}), got non-integer'}[kind]
  if what == 'bits':
    return {'2': 'bits must lie in [0, 2), got [0, 2]', 'nan': 'bits hold 1 NaN/inf values',
            '0.5': 'bits must be integer ids in [0, 2), got non-integer'}[kind]
  if what == 'labels':
    return {'2d': 'labels must be one int or a 1-D sequence of class labels, got an array of shape (2, 2)',
            'range': 'class label out of range', 'float': 'labels must be integers'}[kind]
  if what == 'mask':
    return {'nan': 'keep_mask holds 1 NaN/inf values', '2': 'keep_mask must be in [0, 1] (1 = keep), got min 1 max 2'}[kind]
  return 'token_all_mask is for ELM MLM'


@pytest.mark.parametrize('family,method,arg', CASES, ids=[f'{f}-{m}-{a}' for f, m, a in CASES])
def test_api_refuses_inputs_it_cannot_mean(pipes, family, method, arg):
  p = pipes[family]
  with pytest.raises(ValueError) as e:
    _call(p, method, arg)
  msg = str(e.value)
  assert _expected(p, method, arg) in msg and len(msg.splitlines()) == 1, msg
