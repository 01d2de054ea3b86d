"""``VARPipeline``: a thin facade over the VQVAE, the VAR transformer and the reference-checkpoint interop.

All the logic lives in the Linen modules (``var_jax.models``) and pure functions; the pipeline holds configs and
params and caches jitted functions so repeated calls do not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.interop import state_dict as sd_io
from var_jax.interop import var as ref
from var_jax.models.var_config import VARConfig, VQVAEConfig
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.pipelines.base import Pipeline, check_images, named_mismatch
from var_jax.sampling import var as var_sampling
from var_jax.sampling.common import cast_floating, check_mask, check_sampling_args, check_token_ids, parse_prune



def _check_images(images, cfg: VQVAEConfig, what='images'):
  return check_images(images, cfg.in_channels, cfg.image_size, f'patch_nums {cfg.patch_nums}: last patch '
                      f'{cfg.patch_nums[-1]} x downsample {cfg.downsample}', what, ' in [-1, 1]', lo=-1.0, hi=1.0)


def _vae_method(method, takes: str, doc: str):
  """A pipeline method running ``VQVAE.<method>`` (jitted once) on checked images or on tokens (``takes``)."""
  def run(self, x):
    x = _check_images(x, self.vae_config) if takes == 'images' else self.split_tokens(x)
    return self._vae_fn(method)(self.vae_variables, x)
  run.__doc__ = doc
  return run


@dataclasses.dataclass(frozen=True)
class FastSamplingConfig:
  """The accelerations a ``VARPipeline.with_sampling`` view samples with (``var_jax.sampling.var``)."""
  cfg_until: Optional[int] = None
  prune: Tuple[Tuple[int, float], ...] = ()
  draft_scales: int = 0


class VARPipeline(Pipeline):
  """Tokenizer + transformer with params, e.g. ``VARPipeline.from_torch('vae.pth', 'var.pth')``."""

  family = 'var'
  parts = ('vae', 'var')

  def __init__(self, vae_config: VQVAEConfig, var_config: VARConfig, vae_variables: Dict[str, Any],
               var_variables: Dict[str, Any]):
    if (vae_config.vocab_size, vae_config.z_channels) != (var_config.vocab_size, var_config.z_channels):
      raise ValueError(f'tokenizer (V={vae_config.vocab_size}, Cvae={vae_config.z_channels}) and transformer '
                       f'(V={var_config.vocab_size}, Cvae={var_config.z_channels}) do not fit together')
    if tuple(vae_config.patch_nums) != tuple(var_config.patch_nums):
      raise ValueError(f'patch_nums differ: tokenizer {vae_config.patch_nums} vs transformer {var_config.patch_nums}')
    super().__init__()
    self.vae_config, self.var_config = vae_config, var_config
    self.vae = VQVAE(vae_config)
    self.var = VAR(var_config)
    self.vae_variables = jax.tree.map(jnp.asarray, vae_variables)
    self.var_variables = jax.tree.map(jnp.asarray, var_variables)

  @property
  def num_classes(self) -> int:
    return self.var_config.num_classes

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, vae_path: str, var_path: str, patch_nums: Optional[Sequence[int]] = None,
                 num_heads: Optional[int] = None, vae_overrides: Optional[Dict[str, Any]] = None,
                 allow_cast: bool = False, **var_overrides) -> 'VARPipeline':
    """Load reference checkpoints (``.pth`` or ``.safetensors``); the configs are inferred from the tensors.

    What the tensors cannot tell goes in the overrides, e.g. ``vae_overrides={'using_znorm': True}`` for a
    tokenizer trained with cosine code lookup, or ``drop_path_rate=...`` for the transformer. ``allow_cast``:
    accept integer-stored weights, cast to float32 (``sd_io.validate_tensors``; NaN/inf are always an error)."""
    var_sd = sd_io.load_state_dict(var_path, what='VAR checkpoint')
    with named_mismatch(var_path):
      var_cfg = ref.var_config_from_state_dict(var_sd, patch_nums=patch_nums, num_heads=num_heads, **var_overrides)
    vae_sd = sd_io.load_state_dict(vae_path, what='VQVAE checkpoint')
    with named_mismatch(vae_path):
      vae_cfg = ref.vae_config_from_state_dict(vae_sd, patch_nums=var_cfg.patch_nums, **(vae_overrides or {}))
      vae_vars = ref.import_vae(vae_sd, vae_cfg, allow_cast=allow_cast)
    with named_mismatch(var_path):
      var_vars = ref.import_var(var_sd, var_cfg, allow_cast=allow_cast)
    return cls(vae_cfg, var_cfg, vae_vars, var_vars)

  @classmethod
  def init_random(cls, vae_config: VQVAEConfig, var_config: VARConfig, rng) -> 'VARPipeline':
    """Fresh weights with the reference's initialisation (for training from scratch, tests and benchmarks)."""
    from flax.core import meta
    k1, k2 = jax.random.split(rng)
    s = vae_config.image_size
    vae_vars = jax.jit(functools.partial(VQVAE(vae_config).init, method=VQVAE.init_all))(
        k1, jnp.zeros((1, s, s, vae_config.in_channels)))
    var_vars = jax.jit(VAR(var_config).init)(k2, jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1, var_config.seq_len - var_config.first_l,
                                                        var_config.z_channels)))
    return cls(vae_config, var_config, meta.unbox(vae_vars), meta.unbox(var_vars))

  @classmethod
  def from_checkpoint(cls, path: str) -> 'VARPipeline':
    """Load our own model checkpoint directory (``var_jax.checkpoint``), configs included."""
    from var_jax import checkpoint
    return cls(*checkpoint.load_model(path))

  def save_checkpoint(self, path: str):
    """Write our own model checkpoint directory (orbax params + config.json)."""
    from var_jax import checkpoint
    checkpoint.save_model(path, self.vae_config, self.var_config, jax.device_get(self.vae_variables),
                          jax.device_get(self.var_variables))

  # ------------------------------------------------------------------ export
  def save_torch(self, vae_path: Optional[str], var_path: Optional[str]):
    """Write the reference layout (buffers included); ``.pth`` or ``.safetensors`` by extension."""
    if vae_path:
      sd_io.save_state_dict(ref.export_vae(jax.device_get(self.vae_variables), self.vae_config), vae_path)
    if var_path:
      sd_io.save_state_dict(ref.export_var(jax.device_get(self.var_variables), self.var_config), var_path)

  # ------------------------------------------------------------------ jitted pieces
  def _vae_fn(self, method):
    """``VQVAE.<method>`` of (variables, input), jitted once."""
    return self._cached(method.__name__, lambda: jax.jit(lambda v, x: self.vae.apply(v, x, method=method)))

  # ------------------------------------------------------------------ public API
  encode = _vae_method(VQVAE.img_to_idx, 'images', """images NHWC float32 in [-1, 1] -> tokens per scale, int32
    (B, pn*pn), coarsest first.""")
  encode_features = _vae_method(VQVAE.encode_features, 'images', """``quant_conv(encoder(images))``, (B, h, w,
    Cvae).""")
  fhats = _vae_method(VQVAE.img_to_fhats, 'images', """Accumulated quantized feature after every scale, each
    (B, h, w, Cvae).""")
  reconstruct = _vae_method(VQVAE.img_to_reconstructed_img, 'images', """NHWC in [-1, 1] -> reconstruction NHWC in
    [-1, 1] (all scales).""")
  decode = _vae_method(VQVAE.idx_to_img, 'tokens', """Tokens (list per scale, or concatenated (B, L)) -> images NHWC
    in [-1, 1].""")
  var_input = _vae_method(VQVAE.idx_to_var_input, 'tokens', """Teacher-forcing input (B, L - first_l, Cvae) from
    tokens.""")

  def logits(self, labels, tokens) -> jax.Array:
    """Teacher-forced logits (B, L, V) float32 (no label dropout)."""
    toks = self.split_tokens(tokens)
    labels = self._batch_labels(labels, toks[0].shape[0])
    fn = self._cached('logits', lambda: jax.jit(lambda v, lab, x: self.var.apply(v, lab, x)))
    return fn(self.var_variables, labels, self.var_input(toks))

  # ------------------------------------------------------------------ helpers
  def split_tokens(self, tokens) -> List[jax.Array]:
    """Accept a list of (B, pn^2) per scale or a (B, L) array; check the shapes and that every id is an integer in
    [0, vocab_size) (``check_token_ids``); return the list."""
    pns = self.var_config.patch_nums
    if isinstance(tokens, (list, tuple)):
      for i, t in enumerate(tokens):
        check_token_ids(t, self.var_config.vocab_size, f'tokens of scale {i}')
      toks = [jnp.asarray(t, jnp.int32) for t in tokens]
      want = [p * p for p in pns]
      got = [t.shape[-1] if t.ndim == 2 else None for t in toks]
      if got != want:
        raise ValueError(f'token maps must be (B, pn^2) for patch_nums {pns}: expected lengths {want}, got '
                         f'{[tuple(t.shape) for t in toks]}')
    else:
      check_token_ids(tokens, self.var_config.vocab_size, 'tokens')
      t = jnp.asarray(tokens, jnp.int32)
      if t.ndim != 2 or t.shape[1] != self.var_config.seq_len:
        raise ValueError(f'tokens must be (B, {self.var_config.seq_len}), got shape {tuple(t.shape)}')
      toks = [t[:, b:e] for b, e in self.var_config.begin_ends]
    return toks

  # ------------------------------------------------------------------ sampling
  def _variables(self, which: str, dtype):
    if which == 'var':
      return cast_floating(self.var_variables, dtype)
    vae_vars = dict(self.vae_variables)
    params = dict(vae_vars['params'])
    quant = params.pop('quantize')          # codebook and phis stay float32
    params = cast_floating(params, dtype)
    params['quantize'] = quant
    vae_vars['params'] = params
    return vae_vars

  def sample(self, labels, rng, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
             *, num_samples: Optional[int] = None, batch_size: Optional[int] = None, dtype=jnp.float32,
             shard: bool = True, sample_ids=None, cfg_until: Optional[int] = None, prune=None,
             drafter: Optional['VARPipeline'] = None, draft_scales: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional samples -> (images NHWC float32 in [0, 1], tokens int32 (N, L)), on the host.

    labels: ints in [0, num_classes] (``num_classes`` = unconditional; the CLIs' ``--classes`` follow the same rule),
    a single int with ``num_samples``, or None for random classes
    (``num_samples`` of them). rng: a PRNG key or an int seed; sample i depends only on fold_in(rng, i), so the
    result does not change with ``batch_size`` or the number of devices (``sample_ids`` replaces i by given
    global ids, so a resumed job draws exactly the images a full run would). Batches larger than ``batch_size``
    are split (the last one padded, so one compilation serves all); with several local devices the batch is
    sharded over them. ``dtype=jnp.bfloat16`` computes the transformer and decoder in bf16.

    Training-free accelerations (``var_jax.sampling.var``; README "Faster sampling"), all off by default:
    ``cfg_until=s`` guides scales 0..s only, then samples the conditional half alone; ``prune={scale: keep}``
    runs only the ceil(keep * pn^2) tokens of a scale whose input changed most against the previous scale
    (FastVAR-style; the others take the previous scale's upsampled prediction); ``drafter=other_pipe,
    draft_scales=k``: ``other_pipe`` (a VAR on the same tokenizer, e.g. a larger one) samples scales 0..k-1 and
    this model refines the rest after one teacher-forced pass over them. Defaults set by ``with_sampling`` apply
    where these are left None.
    """
    fast = {**self._fast_defaults, **{k: v for k, v in (('cfg_until', cfg_until), ('prune', prune),
                                                         ('drafter', drafter), ('draft_scales', draft_scales))
                                       if v is not None}}
    check_sampling_args(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, num_samples=num_samples,
                        batch_size=batch_size, cfg_until=fast.get('cfg_until'), draft_scales=fast.get('draft_scales'))
    opts, drafter = self._fast_options(self._options(cfg, top_k, top_p, more_smooth), **fast)
    lab, keys = self._sample_inputs(labels, rng, num_samples, sample_ids)
    return self._sample(opts, [lab, keys], dtype, batch_size, shard, drafter)

  _fast_defaults: Dict[str, Any] = {}

  def with_sampling(self, cfg_until: Optional[int] = None, prune=None, drafter: Optional['VARPipeline'] = None,
                    draft_scales: Optional[int] = None) -> 'VARPipeline':
    """This pipeline (same params and compiled functions) whose ``sample`` defaults to these accelerations (the
    sample / evaluate CLIs' ``--cfg_until``, ``--prune``, ``--drafter_checkpoint`` + ``--draft_scales``). Checked
    here, before any work. Its ``identity()`` includes them (``sampling_config``, the drafter's config and
    weights), so a sample folder made with them is not mistaken for a full sampler's."""
    import copy
    fast = {k: v for k, v in (('cfg_until', cfg_until), ('prune', prune), ('drafter', drafter),
                              ('draft_scales', draft_scales)) if v is not None}
    check_sampling_args(cfg_until=cfg_until, draft_scales=draft_scales)
    opts, drafter = self._fast_options(var_sampling.SamplingOptions(), **fast)
    out = copy.copy(self)
    out._fast_defaults = fast
    out.sampling_config = FastSamplingConfig(opts.cfg_until, opts.prune, opts.draft_scales)
    if drafter is not None:
      out.drafter_config, out.drafter_variables = drafter.var_config, drafter.var_variables
    return out

  def _fast_options(self, opts, cfg_until=None, prune=None, drafter=None, draft_scales=None):
    """``opts`` with the accelerations, checked against this model (ValueError naming the argument); -> (opts,
    drafter or None)."""
    if (drafter is None) != (draft_scales is None or draft_scales == 0):
      raise ValueError('drafter and draft_scales go together: give both (drafter=<VARPipeline>, draft_scales=k) or '
                       f'neither (got drafter={"a pipeline" if drafter is not None else None}, '
                       f'draft_scales={draft_scales})')
    if drafter is not None:
      self._check_drafter(drafter)
    opts = dataclasses.replace(opts, cfg_until=cfg_until, prune=parse_prune(prune),
                               draft_scales=int(draft_scales or 0))
    opts.check_scales(len(self.var_config.patch_nums))
    return opts, drafter

  def _check_drafter(self, drafter):
    """A drafter must be a VAR on this model's tokenizer: same VQVAE config and weights, patch_nums, classes."""
    if not isinstance(drafter, VARPipeline):
      raise ValueError(f'drafter must be a VARPipeline, got {type(drafter).__name__}')
    if drafter.var_config.patch_nums != self.var_config.patch_nums:
      raise ValueError(f'drafter: patch_nums {drafter.var_config.patch_nums} differ from this model\'s '
                       f'{self.var_config.patch_nums}')
    if drafter.var_config.num_classes != self.var_config.num_classes:
      raise ValueError(f'drafter: {drafter.var_config.num_classes} classes, this model has '
                       f'{self.var_config.num_classes}')
    key = id(drafter.vae_variables)
    if self._param_cache.get(('drafter_vae_ok', key)) is drafter.vae_variables:
      return
    same = drafter.vae_config == self.vae_config
    if same:
      a, ta = jax.tree_util.tree_flatten_with_path(self.vae_variables)
      b, tb = jax.tree_util.tree_flatten_with_path(drafter.vae_variables)
      same = ta == tb and all(x.shape == y.shape and bool(jnp.array_equal(x, y)) for (_, x), (_, y) in zip(a, b))
    if not same:
      raise ValueError('drafter: its tokenizer (VQVAE config or weights) differs from this model\'s; a draft/refine '
                       'pair must share one tokenizer (the refiner decodes and re-embeds the drafter\'s tokens)')
    self._param_cache[('drafter_vae_ok', key)] = drafter.vae_variables

  @staticmethod
  def _options(cfg, top_k, top_p, more_smooth) -> var_sampling.SamplingOptions:
    return var_sampling.SamplingOptions(cfg=float(cfg), top_k=int(top_k), top_p=float(top_p),
                                        more_smooth=bool(more_smooth))

  def _sample(self, opts, per_sample, dtype, batch_size, shard, drafter=None):
    edit = len(per_sample) > 2
    dcfg = drafter.var_config if drafter is not None else None
    build = lambda dt: var_sampling.sampler_fn(self.vae_config, self.var_config, opts, dt, edit, dcfg)
    return self._sample_batches((opts, edit, dcfg), build, per_sample, dtype, batch_size, shard,
                                extra_parts=((drafter, 'var'),) if drafter is not None else ())

  def edit(self, images, keep_mask, labels, rng, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
           more_smooth: bool = False, *, batch_size: Optional[int] = None, dtype=jnp.float32,
           shard: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-shot in-/out-painting and class-conditional editing (the reference demo).

    images: NHWC in [-1, 1]. keep_mask: (H, W) or (B, H, W), 1 = keep the input there, 0 = generate; at image
    or finest-token resolution. labels: the class to generate (per image or one int). Returns like ``sample``.
    In-painting: keep_mask 0 inside the hole; out-painting: keep_mask 1 inside the kept centre; class editing:
    keep the background, regenerate the object region under another label.
    """
    check_sampling_args(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, batch_size=batch_size)
    x = _check_images(images, self.vae_config)           # float, finite, in [-1, 1]
    b = x.shape[0]
    m = check_mask(keep_mask, 'keep_mask')
    if m.ndim == 2:
      m = np.broadcast_to(m, (b,) + m.shape)
    if m.ndim != 3 or m.shape[0] != b:
      raise ValueError(f'keep_mask must be (H, W) or (B, H, W) for {b} images, got shape {tuple(m.shape)}')
    pl = self.var_config.patch_nums[-1]
    if m.shape[1:] not in (tuple(x.shape[1:3]), (pl, pl)):
      raise ValueError(f'keep_mask spatial shape {tuple(m.shape[1:])} matches neither the images\' '
                       f'{tuple(x.shape[1:3])} nor the finest token map\'s {(pl, pl)}')
    lab, keys = self._sample_inputs(labels, rng, b)
    if lab.shape[0] != b:
      raise ValueError(f'{lab.shape[0]} labels for {b} images')
    masks = var_sampling.edit_force_masks(m, self.var_config.patch_nums)
    return self._sample(self._options(cfg, top_k, top_p, more_smooth), [lab, keys, self.encode(x), masks], dtype,
                        batch_size, shard)
