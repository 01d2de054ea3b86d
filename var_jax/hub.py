"""Released weights by name: one table (``RELEASES``) of the reference releases on the Hugging Face Hub and one
resolver (``resolve``) that fetches them with ``huggingface_hub.hf_hub_download`` (its local cache, resumed
downloads, offline mode, revision pinning).

Each generator name (``var_d16``, ``L-2-10``, ``bigr_L_d24`` ...) names its Hub repository and file, the tokenizer
it was trained with (itself a name in the table) and the reference ``ModelArgs`` fields its tensors cannot tell;
the loaders (``Pipeline.from_pretrained``, ``load_pipeline(pretrained=...)``, the CLIs' ``--pretrained``, training's
``config.init_from`` / ``vae_ckpt`` / ``bae_ckpt``) infer everything else from the tensors as they do for local
files. ``name@revision`` pins a branch, tag or commit.

Environment (``huggingface_hub``'s own): ``HF_HUB_CACHE`` (the cache folder, read at each call here),
``HF_HUB_OFFLINE=1`` (never touch the network: the cached files only), ``HF_TOKEN``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

VAR_REPO = 'FoundationVision/var'
ELM_REPO = 'xuantonglll/ELM'
BIGR_REPO = 'haoosz/BiGR'


class Release(NamedTuple):
  """One released file: ``kind`` 'var' / 'elm' / 'bigr' (generators) or 'vqvae' / 'bae' (tokenizers)."""
  kind: str
  repo: str
  file: str
  tokenizer: Optional[str] = None           # the tokenizer release a generator decodes with
  model_args: Dict[str, Any] = {}           # reference ModelArgs fields the tensors cannot tell
  note: str = ''


def _elm(size: str, split: str, n_head: int, mlm: bool = False) -> Tuple[str, Release]:
  name = f'{"mlm" if mlm else ""}{size}-{split}'
  bae = {'1-16': 'bae_16', '2-8': 'bae_16', '2-10': 'bae_20', '2-12': 'bae_24'}[split]
  return name, Release('elm', ELM_REPO, f'gpt/{name}.pth', bae, {'n_head': n_head},
                       f'ELM {"MLM" if mlm else "AR"}-{size}, token_each-code_dim {split}, 256px')


def _bigr(name: str, bae: str, n_head: int, res: int = 256) -> Tuple[str, Release]:
  return name, Release('bigr', BIGR_REPO, f'gpt/{name}.pt', bae,
                       {'n_head': n_head, 'p_flip': True, 'focal': 0.0, 'alpha': -1.0},
                       f'BiGR, {res}px (release recipe: p_flip, weighted BCE)')


# name -> Release. Sources: the download links of the reference READMEs (FoundationVision/VAR,
# Pepper-lll/LMforImageGeneration, haoosz/BiGR).
RELEASES: Dict[str, Release] = {
    # VAR: every config is inferred from the tensors (depth, width, patch_nums, shared AdaLN at 512px)
    'vae_ch160v4096z32': Release('vqvae', VAR_REPO, 'vae_ch160v4096z32.pth', note='VAR multi-scale VQVAE, V=4096'),
    **{f'var_d{d}': Release('var', VAR_REPO, f'var_d{d}.pth', 'vae_ch160v4096z32', {}, f'VAR-d{d}, 256px')
       for d in (16, 20, 24, 30)},
    'var_d36': Release('var', VAR_REPO, 'var_d36.pth', 'vae_ch160v4096z32', {}, 'VAR-d36, 512px, shared AdaLN'),
    # ELM binary autoencoders (K = token_each * code_dim bits) and generators
    'bae_16': Release('bae', ELM_REPO, 'bae/bae_16/binaryae_ema.th', note='ELM BAE, K=16, Bernoulli sampling'),
    'bae_16_deter': Release('bae', ELM_REPO, 'bae/bae_16_deter/binaryae_ema.th',
                            note='ELM BAE, K=16, deterministic'),
    'bae_20': Release('bae', ELM_REPO, 'bae/bae_20/binaryae_ema.th', note='ELM BAE, K=20'),
    'bae_24': Release('bae', ELM_REPO, 'bae/bae_24/binaryae_ema.th', note='ELM BAE, K=24'),
    **dict(_elm(size, split, heads) for size, heads, splits in (
        ('L', 16, ('1-16', '2-8', '2-10', '2-12')), ('XL', 20, ('1-16', '2-8', '2-10', '2-12')),
        ('XXL', 24, ('1-16', '2-10', '2-12')), ('2B', 28, ('2-12',))) for split in splits),
    **dict(_elm(size, '1-16', heads, mlm=True) for size, heads in (('L', 16), ('XL', 20), ('XXL', 24))),
    # BiGR binary autoencoders and generators
    'bae_d24': Release('bae', BIGR_REPO, 'bae/bae_d24/binaryae_ema_1000000.th', note='BiGR BAE, K=24, 256px'),
    'bae_d32': Release('bae', BIGR_REPO, 'bae/bae_d32/binaryae_ema_950000.th', note='BiGR BAE, K=32, 256px'),
    'bae_d32_512': Release('bae', BIGR_REPO, 'bae/bae_d32_512/binaryae_ema_720000.th',
                           note='BiGR BAE, K=32, 512px'),
    **dict((_bigr('bigr_L_d24', 'bae_d24', 16), _bigr('bigr_XL_d24', 'bae_d24', 20),
            _bigr('bigr_XXL_d24', 'bae_d24', 24), _bigr('bigr_XXL_d32', 'bae_d32', 24),
            _bigr('bigr_L_d32_512', 'bae_d32_512', 16, res=512))),
}

GENERATOR_KINDS = ('var', 'elm', 'bigr')


class Resolved(NamedTuple):
  """Local paths of a release (in the hub cache): the generator's file, its tokenizer's file, the ModelArgs."""
  name: str
  kind: str
  model: Optional[str]             # None for a tokenizer release
  tokenizer: str                   # the tokenizer file (the release's own file for a tokenizer release)
  model_args: Dict[str, Any]


def names(kind: Optional[str] = None) -> Tuple[str, ...]:
  """The released names (of one ``kind``: 'var', 'elm', 'bigr', 'vqvae', 'bae')."""
  return tuple(n for n, r in RELEASES.items() if kind is None or r.kind == kind)


def _split(name: str) -> Tuple[str, Optional[str]]:
  base, _, rev = str(name).partition('@')
  return base, rev or None


def is_release(name) -> bool:
  """Whether ``name`` (optionally ``name@revision``) is in the table."""
  return isinstance(name, str) and _split(name)[0] in RELEASES


def release(name: str) -> Release:
  """The table entry of ``name`` (``name@revision`` accepted); an unknown name is one ``ValueError`` listing the
  known ones."""
  base = _split(name)[0]
  if base not in RELEASES:
    known = ', '.join(f'{k}: {" ".join(names(k))}' for k in (*GENERATOR_KINDS, 'vqvae', 'bae'))
    raise ValueError(f'unknown released model {base!r}; known names: {known}')
  return RELEASES[base]


def _offline() -> bool:
  return os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')


def download(repo: str, file: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
             what: str = '') -> str:
  """``hf_hub_download(repo, file)`` -> the local path in the hub cache. Not cached while offline, a missing repo,
  file or revision, or no network: one ``FileNotFoundError`` naming the repo, file and revision."""
  try:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors
  except ImportError as e:
    raise ImportError('released weights by name need huggingface_hub: pip install huggingface_hub') from e
  cache_dir = cache_dir or os.environ.get('HF_HUB_CACHE') or None
  offline = _offline()
  where = f'{repo}/{file}' + (f'@{revision}' if revision else '')
  try:
    return hf_hub_download(repo, file, revision=revision, cache_dir=cache_dir, local_files_only=offline)
  except hf_errors.LocalEntryNotFoundError as e:
    why = ('HF_HUB_OFFLINE is set: unset it to download, or fill the cache first' if offline else
           f'the Hub cannot be reached ({e.__cause__ or e})')
    raise FileNotFoundError(f'{what or "released weights"}: {where} is not in the hub cache '
                            f'({cache_dir or "HF_HUB_CACHE default"}) and {why}') from None
  except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError,
          hf_errors.HfHubHTTPError, OSError) as e:
    raise FileNotFoundError(f'{what or "released weights"}: cannot download {where}: {type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else ""}') from None


def resolve(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Resolved:
  """The local files of release ``name`` (``name@revision`` pins one; ``revision`` does too), downloaded into the
  hub cache (``cache_dir``, else ``HF_HUB_CACHE``) when missing; the generator's tokenizer comes with it. The
  tokenizer is fetched from its own repo at its default revision unless both live in one repo."""
  base, rev = _split(name)
  rev = revision or rev
  r = release(base)
  if r.tokenizer is None:
    return Resolved(base, r.kind, None, download(r.repo, r.file, rev, cache_dir, base), {})
  t = RELEASES[r.tokenizer]
  model = download(r.repo, r.file, rev, cache_dir, base)
  tok = download(t.repo, t.file, rev if t.repo == r.repo else None, cache_dir, f'{base} tokenizer {r.tokenizer}')
  return Resolved(base, r.kind, model, tok, dict(r.model_args))


def local_path(value, what: str = 'path', kinds: Optional[Tuple[str, ...]] = None, cache_dir: Optional[str] = None):
  """``value`` as a local (or gs://) path: a released name (``name@revision``) becomes its file in the hub cache
  (a generator's own file, not its tokenizer's); anything else is returned as it is. ``kinds`` limits the names
  accepted (another kind is a ``ValueError`` naming ``what``)."""
  if not is_release(value):
    return value
  r = release(value)
  if kinds is not None and r.kind not in kinds:
    raise ValueError(f'{what}={value} is a released {r.kind} file; expected one of kind {", ".join(kinds)}: '
                     f'{" ".join(n for k in kinds for n in names(k))}')
  base, rev = _split(value)
  return download(r.repo, r.file, rev, cache_dir, f'{what}={base}')


# training config fields that take a file, and the release kinds each accepts per config.task (None: the task's)
_TASK_KINDS = {'var': ('var',), 'tokenizer': ('vqvae', 'bae'), 'elm_ar': ('elm',), 'elm_mlm': ('elm',),
               'bigr': ('bigr',)}
_CONFIG_FILES = {'init_from': None, 'vae_ckpt': ('vqvae',), 'bae_ckpt': ('bae',)}


def resolve_config(config):
  """A training config whose ``init_from`` / ``vae_ckpt`` / ``bae_ckpt`` released names (``var_d16``,
  ``vae_ch160v4096z32``, ``bae_20`` ...) are replaced by their files in the hub cache (a copy; ``config`` itself
  when it names none). ``init_from`` takes a release of the task's kind (VAR: a VAR model, tokenizer: a VQVAE or
  BAE, ELM / BiGR: a generator of that family)."""
  import copy
  found = {k: kinds or _TASK_KINDS[config.task] for k, kinds in _CONFIG_FILES.items()
           if k in config and is_release(config[k])}
  if not found:
    return config
  new = copy.deepcopy(config)
  with new.unlocked():
    for k, kinds in found.items():
      new[k] = local_path(config[k], f'config.{k}', kinds=kinds)
  return new


def table_markdown() -> str:
  """The release table as Markdown (name, kind, repo/file, tokenizer, ModelArgs)."""
  rows = ['| name | kind | Hub file | tokenizer | ModelArgs | note |', '| --- | --- | --- | --- | --- | --- |']
  for n, r in RELEASES.items():
    args = ', '.join(f'{k}={v}' for k, v in r.model_args.items())
    rows.append(f'| `{n}` | {r.kind} | `{r.repo}/{r.file}` | {r.tokenizer or ""} | {args} | {r.note} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  import sys
  if len(sys.argv) == 1:
    print(table_markdown())
  for arg in sys.argv[1:]:                 # python -m var_jax.hub var_d16 L-2-10: download (or find) them
    print(resolve(arg))
