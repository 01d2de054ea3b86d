"""``BiGRPipeline``: the binary autoencoder (BAE) + BiGR with params, for encoding, features, sampling and export.

A thin facade in the manner of ``VARPipeline``: the logic lives in ``var_jax.models.bae``, ``var_jax.models.bigr``
and ``var_jax.sampling.bigr``; the pipeline (``var_jax.pipelines.base``) holds configs and params, checks shapes,
caches jitted functions (one compilation per setting and batch size), splits large batches and shards them over the
local devices.

Conventions: images are NHWC float32 in [0, 1] (neither reference normalises); bits are NHWC (B, h, w, K) uint8
(the reference's (B, K, h, w) transposed); the token sequence is the raster order over (h, w), so
``bits.reshape(B, h*w, K)`` is the reference ``inp`` (B, N, K).

Usage::

  pipe = BiGRPipeline.from_torch('binaryae_ema_1000000.th', 'bigr_L_d24.pt', p_flip=True, focal=0.0,
                                 use_adaLN=True, n_head=16)
  pipe = BiGRPipeline.from_checkpoint('/tmp/bigr_q')  # a training run directory (its model_args.json)
  bits = pipe.encode(images)                       # (B, 16, 16, 24) uint8, threshold p > 0.5
  recon = pipe.decode(bits)                        # (B, 256, 256, 3), not clamped
  feats = pipe.features(images)                    # (B, 24, 1024): token-mean after every layer, null class
  images, bits = pipe.sample([207, 360], rng=0)    # release settings: cfg 3, 20 iterations, Gumbel 0.01
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.interop import bigr as ibigr
from var_jax.models.bae import BAEConfig
from var_jax.models.bigr import BiGR, BiGRConfig
from var_jax.pipelines.base import BinaryLatentPipeline
from var_jax.sampling import bigr as bigr_sampling
from var_jax.sampling.common import as_key, check_sampling_args, resolve_labels

# The release sample script (haoosz/BiGR script/sample.sh + sample.py argparse defaults): cfg 3.0 constant, 20
# iterations, Gumbel 0.01 constant; infer_steps 100 of n_sample_steps 256 and temperature 1.0 come from the
# ``ModelArgs`` (``infer_steps``, ``sample_temperature``), which ``sample`` uses when those arguments are None.
RELEASE_SAMPLING = dict(cfg=3.0, num_iter=20, gumbel_temp=0.01, gumbel_schedule='constant', cfg_schedule='constant',
                        infer_steps=100, temperature=1.0)


class BiGRPipeline(BinaryLatentPipeline):
  """BAE + BiGR with params, e.g. ``BiGRPipeline.from_torch('binaryae.th', 'bigr.pt', **model_args)``."""

  family, model_attr = 'bigr', 'bigr_variables'

  def _set_model(self, bigr_config: BiGRConfig, bigr_variables: Dict[str, Any]):
    self.bigr_config = bigr_config
    self.bigr = BiGR(bigr_config)
    self.bigr_variables = jax.tree.map(jnp.asarray, bigr_variables)

  @staticmethod
  def _latent(c: BiGRConfig):
    grid = int(round(math.sqrt(c.seq_len)))
    if grid * grid != c.seq_len:
      raise ValueError(f'BiGR seq_len {c.seq_len} is not a square grid')
    return grid, c.binary_size, f'BiGR expects binary_size={c.binary_size}'

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_torch(cls, bae_path: Union[str, os.PathLike], bigr_path: Union[str, os.PathLike], *,
                 bae_overrides: Optional[Dict[str, Any]] = None, allow_cast: bool = False,
                 **model_args) -> 'BiGRPipeline':
    """Load the reference checkpoints: ``binaryae*.th`` (``ae.``-prefixed or plain) and ``bigr*.pt``
    (``{'ema': state_dict}`` or plain; ``.safetensors`` too).

    ``model_args``: the reference ``ModelArgs`` fields the weights cannot tell (``n_head``, ``p_flip``, ``focal``,
    ``use_adaLN`` is inferred, ``cls_token_num``, ``infer_steps``, ``sample_temperature`` ...; see
    ``var_jax.interop.bigr.bigr_config_from_state_dict``). The BAE config is inferred from its keys; its
    ``resolution`` (only naming the attention levels) is set to the image size that BiGR's sequence implies.
    ``allow_cast``: accept integer-stored weights, cast to float32 (NaN/inf weights are always an error).
    """
    bae = cls._read_bae(bae_path)         # first: a bad BAE file is named as such, not as a model mismatch
    bigr_cfg, bigr_vars = ibigr.load_bigr(bigr_path, allow_cast=allow_cast, **model_args)
    bae_cfg, bae_vars = cls._load_bae(bae, int(round(math.sqrt(bigr_cfg.seq_len))), bae_overrides, allow_cast)
    return cls(bae_cfg, bigr_cfg, bae_vars, bigr_vars)

  @classmethod
  def init_random(cls, bae_config: BAEConfig, bigr_config: BiGRConfig, rng) -> 'BiGRPipeline':
    """Fresh weights with the reference initialisation (tests, benchmarks, random-feature baselines).

    As in the reference, the transcoder's output layer and adaLN layers start at zero, so a fresh model samples
    p = 0.5 everywhere (the amount of sampling work is the same as with trained weights).
    """
    from flax.core import meta
    k1, k2 = jax.random.split(as_key(rng))
    bae_vars = cls._init_bae(bae_config, k1)
    c = bigr_config
    bigr_vars = jax.jit(BiGR(c).init)(k2, jnp.zeros((1, c.seq_len, c.binary_size), jnp.float32),
                                      jnp.zeros((1,), jnp.int32))
    return cls(bae_config, bigr_config, meta.unbox(bae_vars), meta.unbox(bigr_vars))

  # ------------------------------------------------------------------ export
  def save_torch(self, bae_path: Optional[Union[str, os.PathLike]], bigr_path: Optional[Union[str, os.PathLike]]):
    """Write the reference layouts: ``binaryae.th`` with ``ae.``-prefixed keys (what ``load_pretrain`` reads) and
    ``bigr.pt`` as ``{'ema': state_dict}`` (what ``llama/load_bigr.py`` reads; aliases and buffers included).
    Either path may be None to skip it."""
    self._save_bae(bae_path)
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

  # ------------------------------------------------------------------ checks
  def _is_bits(self, x) -> bool:
    a = np.asarray(x) if not isinstance(x, jax.Array) else x
    if a.ndim == 3:
      return True
    image_shaped = a.ndim == 4 and a.shape[1:] == (self.image_size, self.image_size, self.bae_config.in_channels)
    return a.ndim == 4 and not jnp.issubdtype(a.dtype, jnp.floating) and not image_shaped   # uint8 images: refused

  # ------------------------------------------------------------------ jitted pieces
  def _fn(self, name: str, *static):
    bigr, c = self.bigr, self.bigr_config
    n_cls = c.cls_token_num

    def inputs(bits):
      return bits.reshape(bits.shape[0], -1, c.binary_size).astype(jnp.float32)

    def features_all(v, bits, labels):
      _, inter = bigr.apply(v, inputs(bits), labels, None, return_intermediates=True, method=BiGR.backbone)
      return jnp.stack([h.astype(jnp.float32)[:, n_cls:].mean(1) for h in inter['hidden']], axis=1)

    def features_layer(v, bits, labels):
      return bigr.apply(v, inputs(bits), labels, static[0], method=BiGR.features)[0]

    fns = {'features_all': features_all, 'features_layer': features_layer}
    return self._cached((name,) + static, lambda: jax.jit(fns[name]))

  # ------------------------------------------------------------------ public API
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
    labels = self._batch_labels(label, int(np.shape(x)[0]) if np.ndim(x) else 0, default=self.null_class)
    bits = self._check_bits(x) if self._is_bits(x) else self.encode(x, shard=shard)     # labels checked first
    if layer is not None:
      layer = int(layer)
      if not 0 <= layer < self.num_layers:
        raise ValueError(f'layer must be in 0..{self.num_layers - 1}, got {layer}')
    fn = self._fn('features_all') if layer is None else self._fn('features_layer', layer)
    return self._apply(fn, 'model', [bits, labels], shard)

  # ------------------------------------------------------------------ sampling
  def _sample_settings(self, cfg, num_iter, infer_steps, gumbel_temp, gumbel_schedule, cfg_schedule, temperature):
    c = self.bigr_config
    infer_steps = c.infer_steps if infer_steps is None else int(infer_steps)
    temperature = c.sample_temperature if temperature is None else float(temperature)
    if not temperature > 0:
      raise ValueError(f'temperature must be > 0 (it divides the logits), got {temperature}')
    if not 1 <= infer_steps <= c.n_sample_steps:
      raise ValueError(f'infer_steps must be in 1..{c.n_sample_steps} (n_sample_steps), got {infer_steps}')
    if int(num_iter) < 1:
      raise ValueError(f'num_iter must be >= 1, got {num_iter}')
    if cfg_schedule not in bigr_sampling.CFG_SCHEDULES:
      raise ValueError(f'unknown cfg_schedule {cfg_schedule!r}; expected one of {bigr_sampling.CFG_SCHEDULES}')
    if gumbel_schedule not in bigr_sampling.GUMBEL_SCHEDULES:
      raise ValueError(f'unknown gumbel_schedule {gumbel_schedule!r}; expected one of '
                       f'{bigr_sampling.GUMBEL_SCHEDULES}')
    return tuple(sorted(dict(num_iter=int(num_iter), cfg_scale=float(cfg), cfg_schedule=cfg_schedule,
                             gumbel_temp=float(gumbel_temp), gumbel_schedule=gumbel_schedule, temperature=temperature,
                             infer_steps=infer_steps).items()))

  def _sampler(self, settings: Tuple, dtype, clip: bool):
    """``fn(bae_vars, bigr_vars, labels (B,), keys (B,)) -> (images, bits NHWC)``.

    ``bigr_sampling.make_generate_fn`` draws its noise from one key per call, so it is built for a batch of one
    and vmapped over (label, key) pairs: sample i is exactly the reference loop run on that sample alone with
    randomness from its own key, whatever the batch size, padding or device count. (The CFG pair [cond; null] is
    formed per sample; the reference stacks [all cond; all null], which is the same computation.)
    """
    gen_one = bigr_sampling.make_generate_fn(BiGR(self.bigr_config, dtype=dtype), 1, **dict(settings))
    decode, g, k = self._decoded(clip), self.latent_size, self.binary_size

    def one(bigr_vars, label, rng):
      return gen_one(bigr_vars, label[None], rng)['bits'][0]            # (N, K) uint8

    def fn(bae_vars, bigr_vars, labels, keys):
      seq = jax.vmap(one, in_axes=(None, 0, 0))(bigr_vars, labels, keys)
      bits = seq.reshape(seq.shape[0], g, g, k)
      return decode(bae_vars, bits), bits
    return fn

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
    check_sampling_args(cfg=cfg, num_iter=num_iter, infer_steps=infer_steps, gumbel_temp=gumbel_temp,
                        temperature=temperature, num_samples=num_samples, batch_size=batch_size)
    settings = self._sample_settings(cfg, num_iter, infer_steps, gumbel_temp, gumbel_schedule, cfg_schedule,
                                     temperature)
    return self._generate(settings, labels, rng, noise, clip, dtype, num_samples, sample_ids, batch_size, shard)

  def _sample_injected(self, labels, settings, noise, clip, dtype):
    lab = resolve_labels(labels, None, None, self.num_classes)
    key = ('sample_injected', settings, lab.shape[0], jnp.dtype(dtype).name)
    fn = self._cached(key, lambda: bigr_sampling.make_generate_fn(BiGR(self.bigr_config, dtype=dtype), lab.shape[0],
                                                                 injected=True, **dict(settings)))
    noise = {name: jnp.asarray(noise[name], jnp.float32) for name in ('u_diff', 'u_select', 'gumbel')}
    out = fn(self._params('model', dtype), jnp.asarray(lab), noise)
    g, k = self.latent_size, self.binary_size
    bits = out['bits'].reshape(lab.shape[0], g, g, k)
    images = self.decode(bits, clip=clip, shard=False)
    return np.asarray(images), np.asarray(bits)
