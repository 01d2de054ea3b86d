"""``ELMPipeline``: the binary autoencoder (BAE) + an ELM transformer (AR or MLM) with params.

A thin facade in the manner of ``VARPipeline`` / ``BiGRPipeline``: the logic lives in ``var_jax.models.bae``,
``var_jax.models.elm`` and ``var_jax.sampling.elm``; the pipeline (``var_jax.pipelines.base``) holds configs and
params, checks shapes, caches jitted functions (one compilation per setting and batch size), splits large batches
(padding the last) and shards them over the local devices.

Conventions: images are NHWC float32 in [0, 1] (the reference does not normalise); bits are NHWC (B, h, w, K) uint8
(the reference's (B, K, h, w) transposed); tokens are (B, N, T) int32 sub-tokens, N = h*w in raster order, the K
bits of a cell split into T chunks of code_dim bits, most significant bit first (``var_jax.models.elm``).

Usage::

  pipe = ELMPipeline.from_torch('binaryae_ema_k20.th', 'L-2-10.pth')          # AR or MLM from the keys
  pipe = ELMPipeline.from_checkpoint('/tmp/elm_q')   # a training run directory (its model_args.json)
  bits = pipe.encode(images)                        # (B, 16, 16, 20) uint8, threshold p > 0.5
  tokens = pipe.tokenize(images)                    # (B, 256, 2) int32
  logits = pipe.logits(labels, tokens)              # (B, 512, 1024) teacher-forced
  images, tokens = pipe.sample([207, 360], rng=0)   # FID settings: linear CFG 4.0, top-k 1000, temperature 1
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.interop import elm as ielm
from var_jax.interop.state_dict import load_state_dict
from var_jax.models import elm as E
from var_jax.models.bae import BAEConfig
from var_jax.models.elm import ELMConfig
from var_jax.pipelines.base import BinaryLatentPipeline, named_mismatch
from var_jax.sampling import elm as es
from var_jax.sampling.common import as_key, check_sampling_args, check_token_ids, resolve_labels

PathLike = Union[str, os.PathLike]


class ELMPipeline(BinaryLatentPipeline):
  """BAE + ELM with params, e.g. ``ELMPipeline.from_torch('binaryae.th', 'model.pth', **model_args)``."""

  family, model_attr = 'elm', 'elm_variables'

  @staticmethod
  def _latent(c: ELMConfig):
    return c.grid, c.bits_per_cell, (f'the ELM model needs token_each * code_dim = {c.token_each} * {c.code_dim} = '
                                     f'{c.bits_per_cell}')

  def _set_model(self, elm_config: ELMConfig, elm_variables: Dict[str, Any]):
    self.elm_config = elm_config
    self.model = ielm.elm_model(elm_config)
    # the MLM checkpoint's unused tensors (kept for save_torch), never passed to the model
    self._elm_unused = {k: np.asarray(a) for k, a in dict(elm_variables.pop(ielm.UNUSED, {})).items()}
    self.elm_variables = jax.tree.map(jnp.asarray, elm_variables)

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, bae_path: PathLike, model_path: PathLike, *, bae_overrides: Optional[Dict[str, Any]] = None,
                 allow_cast: bool = False, **model_args) -> 'ELMPipeline':
    """Load the reference checkpoints: ``binaryae*.th`` (``ae.``-prefixed or plain) and the ELM ``model.pth``
    (a plain state_dict; ``.safetensors`` too).

    AR or MLM is inferred from the keys. ``model_args``: the reference ``ModelArgs`` keyword arguments (as given to
    ``GPT_models[...]``), e.g. ``n_head`` for a non-preset size, ``block_size`` for a non-256 AR grid. The fields
    the shapes determine (dim, n_layer, code_dim, token_each, num_classes, the FFN width, ...) are checked: a
    contradiction raises ``CheckpointMismatchError`` naming the field (``var_jax.interop.elm.infer_elm_config``).
    The BAE config is inferred from its keys; its ``resolution`` (only naming the attention levels) is the image
    size the ELM grid implies. ``allow_cast``: accept integer-stored weights, cast to float32
    (``var_jax.interop.state_dict.validate_tensors``; NaN/inf weights are always an error).
    """
    bae = cls._read_bae(bae_path)         # first: a bad BAE file is named as such, not as a model mismatch
    sd = load_state_dict(model_path, what='ELM checkpoint')
    with named_mismatch(model_path):
      elm_cfg = ielm.infer_elm_config(sd, **model_args)
      elm_vars = ielm.import_elm(sd, elm_cfg, keep_unused=True, what='ELM', allow_cast=allow_cast)
    bae_cfg, bae_vars = cls._load_bae(bae, elm_cfg.grid, bae_overrides, allow_cast)
    return cls(bae_cfg, elm_cfg, bae_vars, elm_vars)

  @classmethod
  def init_random(cls, bae_config: BAEConfig, elm_config: ELMConfig, rng) -> 'ELMPipeline':
    """Fresh weights with the reference initialisation (tests, benchmarks). As in the reference, the AR output
    heads (and adaLN layers) start at zero, so a fresh AR model samples uniformly among the top-k."""
    from flax.core import meta
    k1, k2 = jax.random.split(as_key(rng))
    bae_vars = cls._init_bae(bae_config, k1)
    c = elm_config
    tokens = jnp.zeros((1, c.seq_len, c.token_each), jnp.int32)
    elm_vars = jax.jit(ielm.elm_model(c).init)(k2, tokens, jnp.zeros((1,), jnp.int32))
    return cls(bae_config, elm_config, meta.unbox(bae_vars), meta.unbox(elm_vars))

  # ------------------------------------------------------------------ export
  def save_torch(self, bae_path: Optional[PathLike], model_path: Optional[PathLike]):
    """Write the reference layouts: ``binaryae.th`` with ``ae.``-prefixed keys (what ``load_pretrain`` reads) and
    the ELM ``model.pth`` state_dict (loads with ``strict=True``; an MLM's unused tensors are written back as read,
    zeros when absent). Either path may be None to skip it."""
    self._save_bae(bae_path)
    if model_path:
      v = dict(jax.device_get(self.elm_variables))
      if self._elm_unused:
        v[ielm.UNUSED] = self._elm_unused
      ielm.save_elm(v, self.elm_config, os.fspath(model_path))

  def __repr__(self) -> str:
    c, b = self.elm_config, self.bae_config
    return (f'ELMPipeline({c.modeling.upper()}: {c.n_layer} layers, dim {c.dim}, {c.n_head} heads, split '
            f'{c.token_each}-{c.code_dim} (V={c.codebook_size}), N={c.seq_len}, {c.num_classes} classes | BAE '
            f'K={b.codebook_size}, nf={b.nf}, ch_mult={b.ch_mult} | {self.image_size}px)')

  # ------------------------------------------------------------------ properties
  @property
  def modeling(self) -> str:
    return self.elm_config.modeling

  @property
  def num_classes(self) -> int:
    return self.elm_config.num_classes

  @property
  def null_class(self) -> int:
    return self.elm_config.num_classes

  @property
  def seq_len(self) -> int:
    return self.elm_config.seq_len

  @property
  def token_each(self) -> int:
    return self.elm_config.token_each

  @property
  def code_dim(self) -> int:
    return self.elm_config.code_dim

  @property
  def codebook_size(self) -> int:
    return self.elm_config.codebook_size

  # ------------------------------------------------------------------ checks
  def _check_tokens(self, tokens, allow_mask: bool = False, what='tokens') -> jax.Array:
    t = np.asarray(tokens)
    n, te = self.seq_len, self.token_each
    if t.ndim != 3 or t.shape[1:] != (n, te) or not np.issubdtype(t.dtype, np.integer):
      raise ValueError(f'{what} must be integer (B, {n}, {te}) sub-tokens, got {t.dtype} {tuple(t.shape)}')
    check_token_ids(t, self.codebook_size + int(allow_mask), what + (' (the mask id included)' if allow_mask else ''))
    return jnp.asarray(t, jnp.int32)

  # ------------------------------------------------------------------ jitted pieces
  def _fn(self, name: str):
    model = self.model
    fns = {'logits_ar': lambda v, labels, toks: model.apply(v, toks, labels),
           'logits_mlm': lambda v, labels, toks, mask: model.apply(v, toks, labels, token_all_mask=mask)}
    return self._cached(name, lambda: jax.jit(fns[name]))

  # ------------------------------------------------------------------ public API
  def bits_to_tokens(self, bits) -> jax.Array:
    """(B, h, w, K) bits -> (B, N, T) sub-tokens (MSB first within a chunk)."""
    return E.bits_to_tokens(self._check_bits(bits), self.token_each)

  def tokens_to_bits(self, tokens) -> jax.Array:
    """(B, N, T) sub-tokens -> (B, h, w, K) uint8 bits."""
    return E.tokens_to_bits(self._check_tokens(tokens), self.code_dim, (self.latent_size, self.latent_size))

  def tokenize(self, images, *, shard: bool = True) -> jax.Array:
    """Images -> (B, N, T) int32 sub-tokens of the threshold bits."""
    return self.bits_to_tokens(self.encode(images, shard=shard))

  def decode_tokens(self, tokens, *, clip: bool = False, shard: bool = True) -> jax.Array:
    """(B, N, T) sub-tokens -> images NHWC float32."""
    return self.decode(self.tokens_to_bits(tokens), clip=clip, shard=shard)

  def logits(self, labels, tokens, token_all_mask=None, *, shard: bool = True) -> jax.Array:
    """Teacher-forced logits (B, N*T, V) float32 (eval mode: no label dropout); row s*T+i is sub-token i of
    position s.

    AR: input [class, tokens 0..N-2], position s predicts ``tokens[:, s]``. MLM: ``tokens`` may contain the mask
    id 2^code_dim; ``token_all_mask`` (B, N) (1 = masked position, all its sub-tokens) writes it; None = the
    tokens as given. ``labels``: ints in [0, num_classes] (num_classes = the null class), one int for all.
    """
    is_mlm = self.modeling == 'mlm'
    toks = self._check_tokens(tokens, allow_mask=is_mlm)
    labels = self._batch_labels(labels, toks.shape[0])
    if not is_mlm:
      if token_all_mask is not None:
        raise ValueError('token_all_mask is for ELM MLM; this is an AR model')
      return self._apply(self._fn('logits_ar'), 'model', [labels, toks], shard)
    if token_all_mask is not None:
      check_token_ids(token_all_mask, 2, 'token_all_mask')        # 0/1 per position
    mask = (jnp.zeros(toks.shape[:2], jnp.uint8) if token_all_mask is None
            else jnp.asarray(token_all_mask).astype(jnp.uint8))
    if mask.shape != toks.shape[:2]:
      raise ValueError(f'token_all_mask must be (B, N) = {toks.shape[:2]}, got {mask.shape}')
    return self._apply(self._fn('logits_mlm'), 'model', [labels, toks, mask], shard)

  # ------------------------------------------------------------------ sampling
  def _settings(self, cfg, cfg_schedule, temperature, top_k, num_iter, scale_pow) -> Tuple:
    """Validated sampler settings as a hashable tuple (the jit cache key)."""
    c = self.elm_config
    if self.modeling == 'ar':
      if num_iter is not None and int(num_iter) != c.seq_len:
        raise ValueError(f'ELM AR generates one position per step: num_iter must be None or N={c.seq_len}, got '
                         f'{num_iter}')
      if not float(temperature) > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
      if top_k is not None and int(top_k) < 0:
        raise ValueError(f'top_k must be >= 0 (0/None = off), got {top_k}')
      es.cfg_scales(float(cfg), cfg_schedule, 1, 'ar')          # validates the schedule name
      s = dict(cfg_scale=float(cfg), cfg_schedule=cfg_schedule, temperature=float(temperature),
               top_k=None if not top_k else int(top_k))
    else:
      num_iter = c.gen_iter if num_iter is None else int(num_iter)
      if num_iter < 1:
        raise ValueError(f'num_iter must be >= 1, got {num_iter}')
      if float(temperature) < 0:
        raise ValueError(f'temperature must be >= 0, got {temperature}')
      es.cfg_scales(float(cfg), cfg_schedule, 1, 'mlm', float(scale_pow))
      s = dict(num_iter=num_iter, cfg_scale=float(cfg), cfg_schedule=cfg_schedule, temperature=float(temperature),
               scale_pow=float(scale_pow))
    return tuple(sorted(s.items()))

  def _token_fn(self, settings: Tuple, dtype, injected: bool):
    model = ielm.elm_model(self.elm_config, dtype=dtype)
    if self.modeling == 'ar':
      return functools.partial(es.ar_sample_tokens, model, injected=injected, **dict(settings))
    return functools.partial(es.mlm_sample_tokens, model, injected=injected, **dict(settings))

  def _sampler(self, settings: Tuple, dtype, clip: bool, injected: bool = False):
    """``fn(bae_vars, elm_vars, labels (B,), keys (B,) or noise) -> (images NHWC, tokens (B, N, T))``."""
    tokens_fn = self._token_fn(settings, dtype, injected)
    decode, code_dim, g = self._decoded(clip), self.code_dim, self.latent_size

    def fn(bae_vars, elm_vars, labels, randomness):
      tokens = tokens_fn(elm_vars, labels, randomness)['tokens']
      return decode(bae_vars, E.tokens_to_bits(tokens, code_dim, (g, g))), tokens
    return fn

  def sample(self, labels, rng=None, cfg: float = 4.0, cfg_schedule: str = 'linear', temperature: float = 1.0,
             top_k: Optional[int] = 1000, num_iter: Optional[int] = None, *, scale_pow: float = 1.0,
             num_samples: Optional[int] = None, batch_size: Optional[int] = None, shard: bool = True,
             dtype=jnp.float32, clip: bool = True, sample_ids=None,
             noise: Optional[Mapping[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional generation (the reference ``generate_cfg`` + ``bae.decode``) -> host arrays (images NHWC
    float32, clamped to [0, 1] unless ``clip=False``; tokens (B, N, T) int32).

    Defaults are the release FID settings of ELM AR (sample_fid.sh: linear CFG 4.0, top-k 1000, temperature 1).

    Args:
      labels: ints in [0, num_classes] (num_classes = the null class), one int with ``num_samples``, or None for
        random classes (``num_samples`` of them).
      rng: PRNG key or int seed. Sample i uses only ``fold_in(rng, i)`` (``sample_ids`` replaces i by given global
        ids), so results do not change with ``batch_size``, padding or the device count.
      cfg, cfg_schedule: ``u + (c - u) * cfg(step)``. AR: constant, linear, cos, log, square, square_root; MLM:
        constant, linear, powercos (with ``scale_pow``).
      temperature: AR: divides the guided logits; MLM: scales the Gumbel noise of the re-masking order, times
        (1 - ratio) (the reference MLM samples the tokens at temperature 1).
      top_k: AR only (keep logits >= the k-th largest; None/0: off; 1: greedy). The reference MLM generate ignores
        it, and so does this.
      num_iter: MLM iterations (default the config's ``gen_iter``); AR: None (always N steps).
      batch_size: images per compiled call (the last batch is padded); rounded up to a multiple of the local
        device count when sharding.
      dtype: compute dtype of the transformer (and its KV cache); the BAE decodes in float32.
      noise: injected randomness for the whole batch (one call, no batching/sharding), the reference fixtures'
        layout: AR {'uniforms': (N, B, T)}; MLM {'uniforms': (I, B, N*T), 'gumbel': (I, B, N, T)}.
    """
    check_sampling_args(cfg=cfg, temperature=temperature, top_k=top_k, num_iter=num_iter, scale_pow=scale_pow,
                        num_samples=num_samples, batch_size=batch_size)
    settings = self._settings(cfg, cfg_schedule, temperature, top_k, num_iter, scale_pow)
    return self._generate(settings, labels, rng, noise, clip, dtype, num_samples, sample_ids, batch_size, shard)

  def _sample_injected(self, labels, settings, noise, clip, dtype):
    lab = resolve_labels(labels, None, None, self.num_classes)
    if self.modeling == 'ar':
      r = jnp.asarray(noise['uniforms'], jnp.float32)
    else:
      r = {'uniforms': jnp.asarray(noise['uniforms'], jnp.float32), 'gumbel': jnp.asarray(noise['gumbel'],
                                                                                         jnp.float32)}
    key = ('sample_injected', settings, lab.shape[0], jnp.dtype(dtype).name, clip)
    fn = self._cached(key, lambda: jax.jit(self._sampler(settings, dtype, clip, injected=True)))
    im, tk = fn(self._params('bae'), self._params('model', dtype), jnp.asarray(lab), r)
    return np.asarray(im), np.asarray(tk)


__all__ = ['ELMPipeline']
