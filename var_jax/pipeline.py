"""``VARPipeline``: a thin facade over the VQVAE, the VAR transformer and the reference-checkpoint interop.

All the logic lives in the Linen modules (``var_jax.models``) and pure functions; the pipeline holds configs and
params and caches jitted functions so repeated calls do not recompile.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import sampling
from var_jax import sharding as shd
from var_jax.interop import reference as ref
from var_jax.models.configs import VARConfig, VQVAEConfig
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE


def _check_images(images, cfg: VQVAEConfig, what='images'):
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
    raise ValueError(f'{what} must be NHWC with {cfg.in_channels} channels, got shape {tuple(x.shape)}')
  s = cfg.image_size
  if x.shape[1:3] != (s, s):
    raise ValueError(f'{what} must be {s}x{s} for patch_nums {cfg.patch_nums} '
                     f'(last patch {cfg.patch_nums[-1]} x downsample {cfg.downsample}), got {x.shape[1]}x{x.shape[2]}')
  return x.astype(jnp.float32)


class VARPipeline:
  """Tokenizer + transformer with params, e.g. ``VARPipeline.from_torch('vae.pth', 'var.pth')``."""

  def __init__(self, vae_config: VQVAEConfig, var_config: VARConfig, vae_variables: Dict[str, Any],
               var_variables: Dict[str, Any]):
    if (vae_config.vocab_size, vae_config.z_channels) != (var_config.vocab_size, var_config.z_channels):
      raise ValueError(f'tokenizer (V={vae_config.vocab_size}, Cvae={vae_config.z_channels}) and transformer '
                       f'(V={var_config.vocab_size}, Cvae={var_config.z_channels}) do not fit together')
    if tuple(vae_config.patch_nums) != tuple(var_config.patch_nums):
      raise ValueError(f'patch_nums differ: tokenizer {vae_config.patch_nums} vs transformer {var_config.patch_nums}')
    self.vae_config, self.var_config = vae_config, var_config
    self.vae = VQVAE(vae_config)
    self.var = VAR(var_config)
    self.vae_variables = jax.tree.map(jnp.asarray, vae_variables)
    self.var_variables = jax.tree.map(jnp.asarray, var_variables)
    self._jit_cache: Dict[Any, Any] = {}
    self._cast_cache: Dict[Any, Any] = {}

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, vae_path: str, var_path: str, patch_nums: Optional[Sequence[int]] = None,
                 num_heads: Optional[int] = None, vae_overrides: Optional[Dict[str, Any]] = None,
                 **var_overrides) -> 'VARPipeline':
    """Load reference checkpoints (``.pth`` or ``.safetensors``); the configs are inferred from the tensors.

    What the tensors cannot tell goes in the overrides, e.g. ``vae_overrides={'using_znorm': True}`` for a
    tokenizer trained with cosine code lookup, or ``drop_path_rate=...`` for the transformer."""
    var_sd = ref.load_state_dict(var_path)
    var_cfg = ref.var_config_from_state_dict(var_sd, patch_nums=patch_nums, num_heads=num_heads, **var_overrides)
    vae_sd = ref.load_state_dict(vae_path)
    vae_cfg = ref.vae_config_from_state_dict(vae_sd, patch_nums=var_cfg.patch_nums, **(vae_overrides or {}))
    try:
      vae_vars = ref.import_vae(vae_sd, vae_cfg)
    except ref.CheckpointMismatchError as e:
      raise ref.CheckpointMismatchError(f'{vae_path}: {e}') from None
    try:
      var_vars = ref.import_var(var_sd, var_cfg)
    except ref.CheckpointMismatchError as e:
      raise ref.CheckpointMismatchError(f'{var_path}: {e}') from None
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
      ref.save_state_dict(ref.export_vae(jax.device_get(self.vae_variables), self.vae_config), vae_path)
    if var_path:
      ref.save_state_dict(ref.export_var(jax.device_get(self.var_variables), self.var_config), var_path)

  # ------------------------------------------------------------------ jitted pieces
  def _fn(self, name: str):
    if name not in self._jit_cache:
      vae, var = self.vae, self.var
      fns = {
          'encode': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_idx),
          'features': lambda v, x: vae.apply(v, x, method=VQVAE.encode_features),
          'fhats': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_fhats),
          'reconstruct': lambda v, x: vae.apply(v, x, method=VQVAE.img_to_reconstructed_img),
          'decode': lambda v, idx: vae.apply(v, idx, method=VQVAE.idx_to_img),
          'var_input': lambda v, idx: vae.apply(v, idx, method=VQVAE.idx_to_var_input),
          'logits': lambda v, labels, x: var.apply(v, labels, x),
      }
      self._jit_cache[name] = jax.jit(fns[name])
    return self._jit_cache[name]

  # ------------------------------------------------------------------ public API
  def encode(self, images) -> List[jax.Array]:
    """images NHWC float32 in [-1, 1] -> tokens per scale, int32 (B, pn*pn), coarsest first."""
    return self._fn('encode')(self.vae_variables, _check_images(images, self.vae_config))

  def encode_features(self, images) -> jax.Array:
    """``quant_conv(encoder(images))``, (B, h, w, Cvae)."""
    return self._fn('features')(self.vae_variables, _check_images(images, self.vae_config))

  def fhats(self, images) -> List[jax.Array]:
    """Accumulated quantized feature after every scale, each (B, h, w, Cvae)."""
    return self._fn('fhats')(self.vae_variables, _check_images(images, self.vae_config))

  def reconstruct(self, images) -> jax.Array:
    """NHWC in [-1, 1] -> reconstruction NHWC in [-1, 1] (all scales)."""
    return self._fn('reconstruct')(self.vae_variables, _check_images(images, self.vae_config))

  def decode(self, tokens) -> jax.Array:
    """Tokens (list per scale, or concatenated (B, L)) -> images NHWC in [-1, 1]."""
    return self._fn('decode')(self.vae_variables, self.split_tokens(tokens))

  def var_input(self, tokens) -> jax.Array:
    """Teacher-forcing input (B, L - first_l, Cvae) from tokens."""
    return self._fn('var_input')(self.vae_variables, self.split_tokens(tokens))

  def logits(self, labels, tokens) -> jax.Array:
    """Teacher-forced logits (B, L, V) float32 (no label dropout)."""
    toks = self.split_tokens(tokens)
    labels = self._check_labels(labels, toks[0].shape[0])
    return self._fn('logits')(self.var_variables, labels, self.var_input(toks))

  # ------------------------------------------------------------------ helpers
  def split_tokens(self, tokens) -> List[jax.Array]:
    """Accept a list of (B, pn^2) per scale or a (B, L) array; check the shapes; return the list."""
    pns = self.var_config.patch_nums
    if isinstance(tokens, (list, tuple)):
      toks = [jnp.asarray(t, jnp.int32) for t in tokens]
      want = [p * p for p in pns]
      got = [t.shape[-1] if t.ndim == 2 else None for t in toks]
      if got != want:
        raise ValueError(f'token maps must be (B, pn^2) for patch_nums {pns}: expected lengths {want}, got '
                         f'{[tuple(t.shape) for t in toks]}')
    else:
      t = jnp.asarray(tokens, jnp.int32)
      if t.ndim != 2 or t.shape[1] != self.var_config.seq_len:
        raise ValueError(f'tokens must be (B, {self.var_config.seq_len}), got shape {tuple(t.shape)}')
      toks = [t[:, b:e] for b, e in self.var_config.begin_ends]
    return toks

  def _check_labels(self, labels, batch: int):
    labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    if labels.shape[0] != batch:
      raise ValueError(f'{labels.shape[0]} labels for a batch of {batch}')
    lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
    if lo < 0 or hi > self.var_config.num_classes:
      raise ValueError(f'class labels must lie in [0, {self.var_config.num_classes}] '
                       f'({self.var_config.num_classes} = unconditional), got [{lo}, {hi}]')
    return labels

  # ------------------------------------------------------------------ sampling
  def _sampling_params(self, dtype, sharding):
    """Params cast to the compute dtype and placed (replicated) once per (dtype, sharding), then reused."""
    key = (jnp.dtype(dtype).name, sharding)
    if key not in self._cast_cache:
      vae_vars = dict(self.vae_variables)
      params = dict(vae_vars['params'])
      quant = params.pop('quantize')          # codebook and phis stay float32
      params = sampling.cast_floating(params, dtype)
      params['quantize'] = quant
      vae_vars['params'] = params
      var_vars = sampling.cast_floating(self.var_variables, dtype)
      if sharding is not None:
        vae_vars, var_vars = jax.device_put((vae_vars, var_vars), sharding)
      self._cast_cache[key] = (vae_vars, var_vars)
    return self._cast_cache[key]

  def _sampler(self, opts, batch: int, dtype, edit: bool, mesh):
    key = ('sample', opts, batch, jnp.dtype(dtype).name, edit, mesh)
    if key not in self._jit_cache:
      in_sh = out_sh = None
      if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
        in_sh = (rep, rep, data, data) + ((data, data) if edit else ())
        out_sh = (data, data)
      self._jit_cache[key] = sampling.make_sampler(self.vae_config, self.var_config, opts, dtype, edit,
                                                   in_shardings=in_sh, out_shardings=out_sh)
    return self._jit_cache[key]

  _mesh = staticmethod(shd.local_data_mesh)

  def _resolve_labels(self, labels, rng, num_samples):
    return sampling.resolve_labels(labels, rng, num_samples, self.var_config.num_classes)

  def sample(self, labels, rng, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
             *, num_samples: Optional[int] = None, batch_size: Optional[int] = None, dtype=jnp.float32,
             shard: bool = True, sample_ids=None) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional samples -> (images NHWC float32 in [0, 1], tokens int32 (N, L)), on the host.

    labels: ints (``num_classes`` = unconditional), a single int with ``num_samples``, or None for random classes
    (``num_samples`` of them). rng: a PRNG key or an int seed; sample i depends only on fold_in(rng, i), so the
    result does not change with ``batch_size`` or the number of devices (``sample_ids`` replaces i by given
    global ids, so a resumed job draws exactly the images a full run would). Batches larger than ``batch_size``
    are split (the last one padded, so one compilation serves all); with several local devices the batch is
    sharded over them. ``dtype=jnp.bfloat16`` computes the transformer and decoder in bf16.
    """
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
    lab = self._resolve_labels(labels, rng, num_samples)
    opts = sampling.SamplingOptions(cfg=float(cfg), top_k=int(top_k), top_p=float(top_p),
                                    more_smooth=bool(more_smooth))
    return self._run_batched(lab, rng, opts, dtype, batch_size, shard, sample_ids=sample_ids)

  def _run_batched(self, lab, rng, opts, dtype, batch_size, shard, edit_args=None, sample_ids=None):
    n = lab.shape[0]
    ids = jnp.arange(n, dtype=jnp.uint32) if sample_ids is None else jnp.asarray(sample_ids, jnp.uint32).reshape(-1)
    if ids.shape[0] != n:
      raise ValueError(f'{ids.shape[0]} sample_ids for {n} samples')
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)
    bs = int(batch_size or n)
    mesh = self._mesh() if shard else None
    if mesh is not None:
      nd = mesh.devices.size
      bs = -(-bs // nd) * nd                   # a multiple of the device count
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      params = self._sampling_params(dtype, NamedSharding(mesh, P()))
    else:
      params = self._sampling_params(dtype, None)
    fn = self._sampler(opts, bs, dtype, edit_args is not None, mesh)
    imgs, toks = [], []
    for start in range(0, n, bs):
      sl = slice(start, min(start + bs, n))
      m = sl.stop - sl.start
      pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], bs - m, axis=0)]) if m < bs else a
      args = [pad(jnp.asarray(lab[sl])), pad(keys[sl])]
      if edit_args is not None:
        toks_in, masks = edit_args
        args += [[pad(t[sl]) for t in toks_in], [pad(mk[sl]) for mk in masks]]
      im, tk = fn(*params, *args)
      imgs.append(np.asarray(im)[:m])
      toks.append(np.asarray(tk)[:m])
    return np.concatenate(imgs), np.concatenate(toks)

  def edit(self, images, keep_mask, labels, rng, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
           more_smooth: bool = False, *, batch_size: Optional[int] = None, dtype=jnp.float32,
           shard: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-shot in-/out-painting and class-conditional editing (the reference demo).

    images: NHWC in [-1, 1]. keep_mask: (H, W) or (B, H, W), 1 = keep the input there, 0 = generate; at image
    or finest-token resolution. labels: the class to generate (per image or one int). Returns like ``sample``.
    In-painting: keep_mask 0 inside the hole; out-painting: keep_mask 1 inside the kept centre; class editing:
    keep the background, regenerate the object region under another label.
    """
    x = _check_images(images, self.vae_config)
    b = x.shape[0]
    m = np.asarray(keep_mask, np.float32)
    if m.ndim == 2:
      m = np.broadcast_to(m, (b,) + m.shape)
    if m.ndim != 3 or m.shape[0] != b:
      raise ValueError(f'keep_mask must be (H, W) or (B, H, W) for {b} images, got shape {tuple(m.shape)}')
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
    lab = self._resolve_labels(labels, rng, b)
    if lab.shape[0] != b:
      raise ValueError(f'{lab.shape[0]} labels for {b} images')
    toks = self.encode(x)
    masks = sampling.edit_force_masks(m, self.var_config.patch_nums)
    opts = sampling.SamplingOptions(cfg=float(cfg), top_k=int(top_k), top_p=float(top_p),
                                    more_smooth=bool(more_smooth))
    return self._run_batched(lab, rng, opts, dtype, batch_size, shard, edit_args=(toks, masks))
