"""``BiGRPipeline``: the binary autoencoder (BAE) + BiGR with params, for encoding, features, sampling and export.

A thin facade in the manner of ``VARPipeline``: the logic lives in ``var_jax.models.bae``, ``var_jax.models.bigr``
and ``var_jax.bigr_sampling``; the pipeline holds configs and params, checks shapes, caches jitted functions (one
compilation per setting and batch size), splits large batches and shards them over the local devices.

Conventions: images are NHWC float32 in [0, 1] (neither reference normalises); bits are NHWC (B, h, w, K) uint8
(the reference's (B, K, h, w) transposed); the token sequence is the raster order over (h, w), so
``bits.reshape(B, h*w, K)`` is the reference ``inp`` (B, N, K).

Usage::

  pipe = BiGRPipeline.from_torch('binaryae_ema_1000000.th', 'bigr_L_d24.pt', p_flip=True, focal=0.0,
                                 use_adaLN=True, n_head=16)
  bits = pipe.encode(images)                       # (B, 16, 16, 24) uint8, threshold p > 0.5
  recon = pipe.decode(bits)                        # (B, 256, 256, 3), not clamped
  feats = pipe.features(images)                    # (B, 24, 1024): token-mean after every layer, null class
  images, bits = pipe.sample([207, 360], rng=0)    # release settings: cfg 3, 20 iterations, Gumbel 0.01
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import bigr_sampling
from var_jax import sampling as sampling_lib
from var_jax import sharding as shd
from var_jax.interop import bae as ibae
from var_jax.interop import bigr as ibigr
from var_jax.interop.reference import CheckpointMismatchError, load_state_dict
from var_jax.models.bae import BAEConfig, BinaryAutoEncoder
from var_jax.models.bigr import BiGR, BiGRConfig

# The release sample script (haoosz/BiGR script/sample.sh + sample.py argparse defaults): cfg 3.0 constant, 20
# iterations, Gumbel 0.01 constant; infer_steps 100 of n_sample_steps 256 and temperature 1.0 come from the
# ``ModelArgs`` (``infer_steps``, ``sample_temperature``), which ``sample`` uses when those arguments are None.
RELEASE_SAMPLING = dict(cfg=3.0, num_iter=20, gumbel_temp=0.01, gumbel_schedule='constant', cfg_schedule='constant',
                        infer_steps=100, temperature=1.0)


class BiGRPipeline:
  """BAE + BiGR with params, e.g. ``BiGRPipeline.from_torch('binaryae.th', 'bigr.pt', **model_args)``."""

  def __init__(self, bae_config: BAEConfig, bigr_config: BiGRConfig, bae_variables: Mapping[str, Any],
               bigr_variables: Mapping[str, Any]):
    if bae_config.codebook_size != bigr_config.binary_size:
      raise ValueError(f'the BAE has K={bae_config.codebook_size} bits per cell, BiGR expects binary_size='
                       f'{bigr_config.binary_size}')
    grid = int(round(math.sqrt(bigr_config.seq_len)))
    if grid * grid != bigr_config.seq_len:
      raise ValueError(f'BiGR seq_len {bigr_config.seq_len} is not a square grid')
    self.bae_config, self.bigr_config = bae_config, bigr_config
    self.latent_size = grid
    self.image_size = grid * bae_config.downsample
    self.bae = BinaryAutoEncoder(bae_config)
    self.bigr = BiGR(bigr_config)
    self.bae_variables = jax.tree.map(jnp.asarray, dict(bae_variables))
    self.bigr_variables = jax.tree.map(jnp.asarray, dict(bigr_variables))
    self._jit_cache: Dict[Any, Any] = {}
    self._param_cache: Dict[Any, Any] = {}

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, bae_path: Union[str, os.PathLike], bigr_path: Union[str, os.PathLike], *,
                 bae_overrides: Optional[Dict[str, Any]] = None, **model_args) -> 'BiGRPipeline':
    """Load the reference checkpoints: ``binaryae*.th`` (``ae.``-prefixed or plain) and ``bigr*.pt``
    (``{'ema': state_dict}`` or plain; ``.safetensors`` too).

    ``model_args``: the reference ``ModelArgs`` fields the weights cannot tell (``n_head``, ``p_flip``, ``focal``,
    ``use_adaLN`` is inferred, ``cls_token_num``, ``infer_steps``, ``sample_temperature`` ...; see
    ``var_jax.interop.bigr.bigr_config_from_state_dict``). The BAE config is inferred from its keys; its
    ``resolution`` (only naming the attention levels) is set to the image size that BiGR's sequence implies.
    """
    bigr_cfg, bigr_vars = ibigr.load_bigr(bigr_path, **model_args)
    sd = load_state_dict(bae_path)
    own, _ = ibae.split_bae_state_dict(sd, what=os.fspath(bae_path))
    probe_cfg = ibae.bae_config_from_state_dict(own)
    grid = int(round(math.sqrt(bigr_cfg.seq_len)))
    bae_cfg = ibae.bae_config_from_state_dict(own, resolution=grid * probe_cfg.downsample, **(bae_overrides or {}))
    try:
      bae_vars = ibae.import_bae(own, bae_cfg)
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(f'{bae_path}: {e}') from None
    return cls(bae_cfg, bigr_cfg, bae_vars, bigr_vars)

  @classmethod
  def init_random(cls, bae_config: BAEConfig, bigr_config: BiGRConfig, rng) -> 'BiGRPipeline':
    """Fresh weights with the reference initialisation (tests, benchmarks, random-feature baselines).

    As in the reference, the transcoder's output layer and adaLN layers start at zero, so a fresh model samples
    p = 0.5 everywhere (the amount of sampling work is the same as with trained weights).
    """
    from flax.core import meta
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
    k1, k2 = jax.random.split(rng)
    s = bae_config.resolution
    bae_vars = jax.jit(functools.partial(BinaryAutoEncoder(bae_config).init, train=False))(
        k1, jnp.zeros((1, s, s, bae_config.in_channels), jnp.float32))
    c = bigr_config
    bigr_vars = jax.jit(BiGR(c).init)(k2, jnp.zeros((1, c.seq_len, c.binary_size), jnp.float32),
                                      jnp.zeros((1,), jnp.int32))
    return cls(bae_config, bigr_config, meta.unbox(bae_vars), meta.unbox(bigr_vars))

  # ------------------------------------------------------------------ export
  def save_torch(self, bae_path: Optional[Union[str, os.PathLike]], bigr_path: Optional[Union[str, os.PathLike]]):
    """Write the reference layouts: ``binaryae.th`` with ``ae.``-prefixed keys (what ``load_pretrain`` reads) and
    ``bigr.pt`` as ``{'ema': state_dict}`` (what ``llama/load_bigr.py`` reads; aliases and buffers included).
    Either path may be None to skip it."""
    if bae_path:
      ibae.save_bae(jax.device_get(self.bae_variables), self.bae_config, os.fspath(bae_path))
    if bigr_path:
      ibigr.save_bigr(os.fspath(bigr_path), jax.device_get(self.bigr_variables), self.bigr_config)

  # ------------------------------------------------------------------ properties
  @property
  def num_classes(self) -> int:
    return self.bigr_config.num_classes

  @property
  def null_class(self) -> int:
    return self.bigr_config.null_class

  @property
  def num_layers(self) -> int:
    return self.bigr_config.n_layer

  @property
  def feature_dim(self) -> int:
    return self.bigr_config.dim

  @property
  def binary_size(self) -> int:
    return self.bigr_config.binary_size

  # ------------------------------------------------------------------ devices
  _mesh = staticmethod(shd.local_data_mesh)

  def _params(self, which: str, dtype=jnp.float32, sharding=None):
    """The BAE or BiGR variables, cast (BiGR only) and placed (replicated) once per (dtype, sharding)."""
    key = (which, jnp.dtype(dtype).name, sharding)
    if key not in self._param_cache:
      if which == 'bae':
        v = self.bae_variables
      else:
        v = self.bigr_variables
        if jnp.dtype(dtype) != jnp.float32:
          v = sampling_lib.cast_floating(v, dtype)
      self._param_cache[key] = jax.device_put(v, sharding) if sharding is not None else v
    return self._param_cache[key]

  def _placed(self, which: str, arrays: Sequence[jax.Array], shard: bool):
    """(params, arrays): arrays sharded on their batch axis over the local devices when it divides evenly."""
    mesh = self._mesh() if shard else None
    b = arrays[0].shape[0]
    if mesh is None or b % mesh.devices.size:
      return self._params(which), list(arrays)
    from jax.sharding import NamedSharding, PartitionSpec as P
    data = NamedSharding(mesh, P('data'))
    return self._params(which, sharding=NamedSharding(mesh, P())), [jax.device_put(a, data) for a in arrays]

  # ------------------------------------------------------------------ checks
  def _check_images(self, images, what='images') -> jax.Array:
    x = jnp.asarray(images)
    c = self.bae_config.in_channels
    if x.ndim != 4 or x.shape[-1] != c:
      raise ValueError(f'{what} must be NHWC with {c} channels in [0, 1], got shape {tuple(x.shape)}')
    s = self.image_size
    if x.shape[1:3] != (s, s):
      raise ValueError(f'{what} must be {s}x{s} (BiGR grid {self.latent_size} x BAE downsample '
                       f'{self.bae_config.downsample}), got {x.shape[1]}x{x.shape[2]}')
    return x.astype(jnp.float32)

  def _check_bits(self, bits, what='bits') -> jax.Array:
    """(B, h, w, K) or (B, N, K) 0/1 -> (B, h, w, K) uint8."""
    b = jnp.asarray(bits)
    g, k = self.latent_size, self.binary_size
    if b.ndim == 3 and b.shape[1:] == (g * g, k):
      b = b.reshape(b.shape[0], g, g, k)
    if b.ndim != 4 or b.shape[1:] != (g, g, k):
      raise ValueError(f'{what} must be (B, {g}, {g}, {k}) (or (B, {g * g}, {k})), got shape {tuple(b.shape)}')
    return (b > 0).astype(jnp.uint8) if jnp.issubdtype(b.dtype, jnp.floating) else b.astype(jnp.uint8)

  def _is_bits(self, x) -> bool:
    a = np.asarray(x) if not isinstance(x, jax.Array) else x
    if a.ndim == 3:
      return True
    return a.ndim == 4 and not jnp.issubdtype(a.dtype, jnp.floating)

  def _labels(self, label, batch: int) -> jax.Array:
    """None -> the null class; an int -> that class for all; (B,) -> per sample. Range [0, num_classes]."""
    if label is None:
      return jnp.full((batch,), self.null_class, jnp.int32)
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):
      raise ValueError(f'labels must be integers in [0, {self.num_classes}], got {label!r}')
    lab = np.full((batch,), int(lab)) if lab.ndim == 0 else lab.reshape(-1)
    if lab.shape != (batch,):
      raise ValueError(f'{lab.size} labels for a batch of {batch}')
    if lab.min() < 0 or lab.max() > self.num_classes:
      raise ValueError(f'class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), got '
                       f'min {lab.min()} max {lab.max()}')
    return jnp.asarray(lab, jnp.int32)

  # ------------------------------------------------------------------ jitted pieces
  def _fn(self, name: str, *static):
    key = (name,) + static
    if key in self._jit_cache:
      return self._jit_cache[key]
    bae, bigr, c = self.bae, self.bigr, self.bigr_config
    n_cls = c.cls_token_num
    if name == 'encode_threshold':
      fn = lambda v, x: bae.apply(v, x, method=BinaryAutoEncoder.bits)
    elif name == 'encode_bernoulli':
      def fn(v, x, keys):
        shape = x.shape[1:3]
        u = jax.vmap(lambda kk: jax.random.uniform(kk, (shape[0] // self.bae_config.downsample,
                                                        shape[1] // self.bae_config.downsample,
                                                        self.binary_size)))(keys)
        return bae.apply(v, x, 'bernoulli', None, u, method=BinaryAutoEncoder.bits)
    elif name == 'decode':
      fn = lambda v, bits: bae.apply(v, bits, method=BinaryAutoEncoder.decode)
    elif name == 'features_all':
      def fn(v, bits, labels):
        inp = bits.reshape(bits.shape[0], -1, c.binary_size).astype(jnp.float32)
        _, inter = bigr.apply(v, inp, labels, None, return_intermediates=True, method=BiGR.backbone)
        return jnp.stack([h.astype(jnp.float32)[:, n_cls:].mean(1) for h in inter['hidden']], axis=1)
    elif name == 'features_layer':
      layer, = static
      def fn(v, bits, labels):
        inp = bits.reshape(bits.shape[0], -1, c.binary_size).astype(jnp.float32)
        return bigr.apply(v, inp, labels, layer, method=BiGR.features)[0]
    else:
      raise KeyError(name)
    self._jit_cache[key] = jax.jit(fn)
    return self._jit_cache[key]

  # ------------------------------------------------------------------ public API
  def encode(self, images, mode: str = 'threshold', rng=None, *, shard: bool = True) -> jax.Array:
    """Images NHWC in [0, 1] -> bits (B, h, w, K) uint8.

    ``mode='threshold'``: ``p > 0.5`` (the code BiGR is evaluated and probed on). ``mode='bernoulli'``: ``u < p``
    (how the reference tokenises for training); ``rng`` a PRNG key or int seed, image i draws from
    ``fold_in(rng, i)`` (independent of the batch composition).
    """
    x = self._check_images(images)
    if mode == 'threshold':
      params, (x,) = self._placed('bae', [x], shard)
      return self._fn('encode_threshold')(params, x)
    if mode == 'bernoulli':
      if rng is None:
        raise ValueError("mode='bernoulli' needs rng (a PRNG key or an int seed)")
      if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
      keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(x.shape[0], dtype=jnp.uint32))
      params, (x, keys) = self._placed('bae', [x, keys], shard)
      return self._fn('encode_bernoulli')(params, x, keys)
    raise ValueError(f"mode must be 'threshold' or 'bernoulli', got {mode!r}")

  def decode(self, bits, *, clip: bool = False, shard: bool = True) -> jax.Array:
    """Bits (B, h, w, K) (or (B, N, K)) -> images NHWC float32 (the reference ``bae.decode``).

    A trained BAE decodes to [0, 1]; the output is not clamped unless ``clip`` (the reference clamps only when it
    writes files: ``save_image(.., value_range=(0, 1))``)."""
    b = self._check_bits(bits)
    params, (b,) = self._placed('bae', [b], shard)
    out = self._fn('decode')(params, b)
    return jnp.clip(out, 0.0, 1.0) if clip else out

  def features(self, images_or_bits, layer: Optional[int] = None, label=None, *, shard: bool = True) -> jax.Array:
    """Pooled BiGR features: the reference ``forward_full_image(inp, cond, layer).mean(1)``.

    Args:
      images_or_bits: images NHWC float in [0, 1] (encoded with the threshold rule), or bits: a 4-D integer/bool
        array (B, h, w, K), or any 3-D array (B, N, K) of 0/1 (the reference ``inp``).
      layer: None for every layer -> (B, n_layer, D); an int in 0..n_layer-1 -> (B, D) (blocks 0..layer, the
        later ones are not run).
      label: None = the null class (unconditional features, the fair choice for a probe); an int for all, or (B,)
        labels. Note: the true label as condition leaks the class into every token through attention.

    The bits enter unmasked, the class slots are dropped, no final norm; float32.
    """
    x = images_or_bits
    bits = self._check_bits(x) if self._is_bits(x) else self.encode(x, shard=shard)
    labels = self._labels(label, bits.shape[0])
    if layer is not None:
      layer = int(layer)
      if not 0 <= layer < self.num_layers:
        raise ValueError(f'layer must be in 0..{self.num_layers - 1}, got {layer}')
    params, (bits, labels) = self._placed('bigr', [bits, labels], shard)
    if layer is None:
      return self._fn('features_all')(params, bits, labels)
    return self._fn('features_layer', layer)(params, bits, labels)

  # ------------------------------------------------------------------ sampling
  def _resolve_labels(self, labels, rng, num_samples):
    return sampling_lib.resolve_labels(labels, rng, num_samples, self.num_classes)

  def _sample_settings(self, cfg, num_iter, infer_steps, gumbel_temp, gumbel_schedule, cfg_schedule, temperature):
    c = self.bigr_config
    infer_steps = c.infer_steps if infer_steps is None else int(infer_steps)
    temperature = c.sample_temperature if temperature is None else float(temperature)
    if not 1 <= infer_steps <= c.n_sample_steps:
      raise ValueError(f'infer_steps must be in 1..{c.n_sample_steps} (n_sample_steps), got {infer_steps}')
    if int(num_iter) < 1:
      raise ValueError(f'num_iter must be >= 1, got {num_iter}')
    if cfg_schedule not in bigr_sampling.CFG_SCHEDULES:
      raise ValueError(f'unknown cfg_schedule {cfg_schedule!r}; expected one of {bigr_sampling.CFG_SCHEDULES}')
    if gumbel_schedule not in bigr_sampling.GUMBEL_SCHEDULES:
      raise ValueError(f'unknown gumbel_schedule {gumbel_schedule!r}; expected one of '
                       f'{bigr_sampling.GUMBEL_SCHEDULES}')
    return dict(num_iter=int(num_iter), cfg_scale=float(cfg), cfg_schedule=cfg_schedule,
                gumbel_temp=float(gumbel_temp), gumbel_schedule=gumbel_schedule, temperature=temperature,
                infer_steps=infer_steps)

  def _sampler(self, settings: Tuple, batch: int, dtype, clip: bool, mesh):
    """A jitted ``fn(bae_vars, bigr_vars, labels (B,), keys (B,)) -> (images, bits NHWC)``.

    ``bigr_sampling.make_generate_fn`` draws its noise from one key per call, so it is built for a batch of one
    and vmapped over (label, key) pairs: sample i is exactly the reference loop run on that sample alone with
    randomness from its own key, whatever the batch size, padding or device count. (The CFG pair [cond; null] is
    formed per sample; the reference stacks [all cond; all null], which is the same computation.)
    """
    key = ('sample', settings, batch, jnp.dtype(dtype).name, clip, mesh)
    if key in self._jit_cache:
      return self._jit_cache[key]
    model = BiGR(self.bigr_config, dtype=dtype)
    gen_one = bigr_sampling.make_generate_fn(model, 1, **dict(settings))
    g, k = self.latent_size, self.binary_size
    bae = self.bae

    def one(bigr_vars, label, rng):
      return gen_one(bigr_vars, label[None], rng)['bits'][0]            # (N, K) uint8

    def fn(bae_vars, bigr_vars, labels, keys):
      seq = jax.vmap(one, in_axes=(None, 0, 0))(bigr_vars, labels, keys)
      bits = seq.reshape(seq.shape[0], g, g, k)
      images = bae.apply(bae_vars, bits, method=BinaryAutoEncoder.decode)
      return (jnp.clip(images, 0.0, 1.0) if clip else images), bits

    kw = {}
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
      kw = dict(in_shardings=(rep, rep, data, data), out_shardings=(data, data))
    self._jit_cache[key] = jax.jit(fn, **kw)
    return self._jit_cache[key]

  def sample(self, labels, rng=None, cfg: float = 3.0, num_iter: int = 20, infer_steps: Optional[int] = None,
             gumbel_temp: float = 0.01, gumbel_schedule: str = 'constant', cfg_schedule: str = 'constant',
             temperature: Optional[float] = None, *, num_samples: Optional[int] = None,
             batch_size: Optional[int] = None, shard: bool = True, dtype=jnp.float32, clip: bool = True,
             sample_ids=None, noise: Optional[Mapping[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Class-conditional generation (the reference ``generate_with_cfg`` + ``bae.decode``) -> host arrays
    (images NHWC float32, clamped to [0, 1] unless ``clip=False``; bits (B, h, w, K) uint8).

    Defaults are the release sample script: CFG 3.0 constant, 20 iterations, Gumbel 0.01 constant, and (when
    None) the model's ``infer_steps`` (release 100 of n_sample_steps 256) and ``sample_temperature`` (1.0).

    Args:
      labels: ints in [0, num_classes] (num_classes = the null class, i.e. unconditional), one int with
        ``num_samples``, or None for random classes (``num_samples`` of them).
      rng: PRNG key or int seed. Sample i uses only ``fold_in(rng, i)`` (``sample_ids`` replaces i by given global
        ids), so results do not change with ``batch_size``, padding or the device count.
      cfg, cfg_schedule: CFG on the transcoder logits ('constant' or 'linear'); the reference needs cfg > 1.
      num_iter: unmasking iterations (cosine schedule). infer_steps: diffusion steps per iteration.
      gumbel_temp, gumbel_schedule: Gumbel noise on the confidences ('constant', 'down', 'up').
      temperature: divides the transcoder logits.
      batch_size: images per compiled call (the last batch is padded); rounded up to a multiple of the local
        device count when sharding.
      dtype: compute dtype of BiGR (bfloat16 for speed); the BAE decodes in float32.
      noise: injected randomness for the whole batch (one call, no batching/sharding): {'u_diff': (I, S, B*N, K),
        'u_select': (I, B, N, K), 'gumbel': (I, B, N)}, the reference fixtures' layout (see ``bigr_sampling``).
    """
    settings = self._sample_settings(cfg, num_iter, infer_steps, gumbel_temp, gumbel_schedule, cfg_schedule,
                                     temperature)
    if noise is not None:
      return self._sample_injected(labels, settings, noise, clip, dtype)
    if rng is None:
      raise ValueError('sample needs rng (a PRNG key or an int seed) unless noise is given')
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
    lab = self._resolve_labels(labels, rng, num_samples)
    n = lab.shape[0]
    ids = jnp.arange(n, dtype=jnp.uint32) if sample_ids is None else jnp.asarray(sample_ids, jnp.uint32).reshape(-1)
    if ids.shape[0] != n:
      raise ValueError(f'{ids.shape[0]} sample_ids for {n} samples')
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)
    bs = int(batch_size or n)
    if bs < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    mesh = self._mesh() if shard else None
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      nd = mesh.devices.size
      bs = -(-bs // nd) * nd
      rep = NamedSharding(mesh, P())
      params = (self._params('bae', sharding=rep), self._params('bigr', dtype, sharding=rep))
    else:
      params = (self._params('bae'), self._params('bigr', dtype))
    fn = self._sampler(tuple(sorted(settings.items())), bs, dtype, bool(clip), mesh)
    imgs, bits = [], []
    for start in range(0, n, bs):
      stop = min(start + bs, n)
      m = stop - start
      pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], bs - m, axis=0)]) if m < bs else a
      im, bt = fn(*params, pad(jnp.asarray(lab[start:stop])), pad(keys[start:stop]))
      imgs.append(np.asarray(im)[:m])
      bits.append(np.asarray(bt)[:m])
    return np.concatenate(imgs), np.concatenate(bits)

  def _sample_injected(self, labels, settings, noise, clip, dtype):
    lab = np.asarray(labels, np.int32).reshape(-1)
    if lab.size == 0 or lab.min() < 0 or lab.max() > self.num_classes:
      raise ValueError(f'labels must lie in [0, {self.num_classes}], got {labels!r}')
    key = ('sample_injected', tuple(sorted(settings.items())), lab.shape[0], jnp.dtype(dtype).name)
    if key not in self._jit_cache:
      self._jit_cache[key] = bigr_sampling.make_generate_fn(BiGR(self.bigr_config, dtype=dtype), lab.shape[0],
                                                            injected=True, **settings)
    noise = {name: jnp.asarray(noise[name], jnp.float32) for name in ('u_diff', 'u_select', 'gumbel')}
    out = self._jit_cache[key](self._params('bigr', dtype), jnp.asarray(lab), noise)
    g, k = self.latent_size, self.binary_size
    bits = out['bits'].reshape(lab.shape[0], g, g, k)
    images = self.decode(bits, clip=clip, shard=False)
    return np.asarray(images), np.asarray(bits)
