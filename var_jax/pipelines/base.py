"""What the three pipelines share: PRNG-key and label handling, compute-dtype casting, placement over the local
devices, the batched sampling loop and the jit cache; and, for ELM and BiGR, the binary autoencoder around them.

Placement: with several local devices a batch is padded to a multiple of the device count (repeating its last
example), sharded over a 1-D ``'data'`` mesh (``sharding.local_data_mesh``) with the params replicated, and the
outputs are sliced back; one device (or ``shard=False``) runs unsharded.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from var_jax import fileio
from var_jax import sharding as shd
from var_jax.dtypes import parse_dtype
from var_jax.interop import bae as ibae
from var_jax.interop.state_dict import CheckpointMismatchError, load_state_dict
from var_jax.models.bae import BAEConfig, BinaryAutoEncoder
from var_jax.sampling.common import (as_key, batch_labels, cast_floating, check_token_ids, per_sample_keys,
                                    resolve_labels)


RANGE_TOL = 0.05    # images beyond [lo - tol, hi + tol] of their value range are refused
_RANGE_HINT = {(-1.0, 1.0): 'e.g. [0, 255] images: x / 127.5 - 1', (0.0, 1.0): 'e.g. [0, 255] images: x / 255'}


def check_images(images, channels: int, size: int, why: str, what: str = 'images', value_range: str = '',
                 lo: Optional[float] = None, hi: Optional[float] = None):
  """The one image validator of the pipelines' inputs (``encode``, ``reconstruct``, ``features``, ``edit``, ...):
  NHWC with ``channels`` channels at ``size`` x ``size`` (``why`` explains the size), a floating dtype (a uint8
  0..255 array is refused, with the conversion), every value finite and, with ``lo``/``hi``, within [lo, hi] (up to
  ``RANGE_TOL``) -> float32. Each failure a ValueError naming ``what``."""
  x = jnp.asarray(images)
  span = f'[{lo:g}, {hi:g}]' if lo is not None else ''
  hint = _RANGE_HINT.get((lo, hi), '')
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f'{what} must be NHWC with {channels} channels{value_range}, got shape {tuple(x.shape)}')
  if x.shape[1:3] != (size, size):
    raise ValueError(f'{what} must be {size}x{size} ({why}), got {x.shape[1]}x{x.shape[2]}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{what} must be floating-point{" in " + span if span else ""}, got {x.dtype}'
                     f'{f" ({hint})" if hint else ""}')
  x = x.astype(jnp.float32)
  bad = int(jnp.sum(~jnp.isfinite(x)))
  if bad:
    raise ValueError(f'{what} hold {bad} NaN/inf values')
  if lo is not None:
    mn, mx = float(jnp.min(x)), float(jnp.max(x))
    if mn < lo - RANGE_TOL or mx > hi + RANGE_TOL:
      raise ValueError(f'{what} must be in {span}, got min {mn:g} max {mx:g}{f" ({hint})" if hint else ""}')
  return x


# ----------------------------------------------------------------------------- ELM / BiGR training runs
RUN_FILE = 'model_args.json'           # written by ``var_jax.train.tasks.bits.export`` beside the exported model
RUN_TASKS = {'elm_ar': 'elm', 'elm_mlm': 'elm', 'bigr': 'bigr'}      # config.task -> pipeline family
_RUN_FAMILIES = {'elm': ('an ELM', 'ELMPipeline'), 'bigr': ('a BiGR', 'BiGRPipeline')}


class BitsRun(NamedTuple):
  """An ELM / BiGR training run directory as its ``model_args.json`` describes it, paths resolved."""
  info_file: str                       # the model_args.json
  task: str                            # 'elm_ar' | 'elm_mlm' | 'bigr'
  model_file: str                      # the exported generator (its ``file``, in the run directory)
  bae_file: str                        # its ``bae_file``: in the run directory when a bare name there, else as is
  model_args: Dict[str, Any]           # the reference ModelArgs that reload model_file
  bae_config: Dict[str, Any]           # its ``bae``: the trained BAEConfig's fields ({} in a json without them)
  bae_resolution: Optional[int]        # its ``bae_resolution``: the image size the run trained on

  @property
  def family(self) -> str:
    return RUN_TASKS[self.task]

  def check_family(self, family: str, asked: str):
    """A ValueError naming the json and its task unless the run is of ``family`` (``asked``: what was asked for)."""
    if self.family != family:
      name, loader = _RUN_FAMILIES[self.family]
      raise ValueError(f'{self.info_file}: {name} run (task {self.task!r}), not {asked}; load it with '
                       f'{loader}.from_checkpoint, or --checkpoint / load_pipeline(checkpoint=...) with --model=auto')

  def check_image_size(self, pipe: 'BinaryLatentPipeline'):
    """The loaded pipeline draws images of the size the run trained on (``bae_resolution``)."""
    if self.bae_resolution is not None and pipe.image_size != int(self.bae_resolution):
      raise ValueError(f"{self.info_file}: the model's {pipe.latent_size}x{pipe.latent_size} grid x BAE downsample "
                       f"{pipe.bae_config.downsample} gives {pipe.image_size} px images, but the run trained on "
                       f"bae_resolution={self.bae_resolution} px")


def is_bits_run(run_dir) -> bool:
  """True when ``run_dir`` holds an ELM / BiGR training run's ``model_args.json``."""
  return fileio.isfile(os.path.join(os.fspath(run_dir), RUN_FILE))


def read_bits_run(run_dir) -> BitsRun:
  """Read ``<run_dir>/model_args.json`` (local or remote); errors name the directory or the file and what is
  wrong."""
  d = os.fspath(run_dir)
  path = os.path.join(d, RUN_FILE)
  if not fileio.isfile(path):
    if not fileio.exists(d):
      raise FileNotFoundError(f'{d}: no such ELM/BiGR run directory')
    raise ValueError(f'{d} is not an ELM/BiGR training run directory: it has no {RUN_FILE} (expected the workdir of '
                     f'`python -m var_jax.train` with an elm_*/bigr config, where the end of training writes '
                     f'{RUN_FILE} beside the exported model.pth / bigr.pt; reference checkpoints load with '
                     f'--bae_ckpt/--model_ckpt)')
  try:
    info = json.loads(fileio.path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  task = info.get('task') if isinstance(info, dict) else None
  if task not in RUN_TASKS:
    raise ValueError(f'{path}: task {task!r} is not an ELM/BiGR task ({", ".join(RUN_TASKS)})')
  missing = [k for k in ('file', 'model_args', 'bae_file') if info.get(k) in (None, '')]
  if missing:
    raise ValueError(f'{path}: no {", ".join(missing)} (an ELM/BiGR run\'s {RUN_FILE} names the model file, its '
                     f'ModelArgs and the BAE file)')
  if not isinstance(info['model_args'], dict) or not isinstance(info.get('bae') or {}, dict):
    raise ValueError(f'{path}: model_args and bae must be JSON objects')
  bae = str(info['bae_file'])
  beside = os.path.join(d, bae)
  if os.path.basename(bae) == bae and fileio.isfile(beside):
    bae = beside
  res = info.get('bae_resolution')
  return BitsRun(path, task, os.path.join(d, str(info['file'])), bae, dict(info['model_args']),
                 dict(info.get('bae') or {}), None if res is None else int(res))


def bits_run_beside(model_file) -> Optional[BitsRun]:
  """The run whose ``model_args.json`` sits beside ``model_file`` and names it as its model, else None."""
  d = os.path.dirname(os.fspath(model_file))
  if not is_bits_run(d or '.'):
    return None
  run = read_bits_run(d or '.')
  return run if os.path.basename(run.model_file) == os.path.basename(os.fspath(model_file)) else None


class BAEFile(NamedTuple):
  """A read BAE checkpoint: its path, its own state_dict (no ``ae.``) and the config its keys imply."""
  path: str
  own: Dict[str, Any]
  config: BAEConfig


@contextlib.contextmanager
def named_mismatch(path):
  """Prefix a ``CheckpointMismatchError`` raised inside with the checkpoint's path."""
  try:
    yield
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f'{os.fspath(path)}: {e}') from None


def _pad(a, size: int):
  """Pad axis 0 to ``size`` by repeating the last entry."""
  a = jnp.asarray(a)
  m = a.shape[0]
  return jnp.concatenate([a, jnp.repeat(a[-1:], size - m, axis=0)]) if m < size else a


def _data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


class Pipeline:
  """Configs + params of one model family, with cached compiled functions. Subclasses set ``family``, ``parts``
  (the variable sets a sampler takes, in order) and implement ``num_classes`` and ``_variables``."""

  family: str = ''
  parts: Tuple[str, ...] = ()
  float32_parts: Tuple[str, ...] = ()      # never cast to the compute dtype

  def __init__(self):
    self._jit_cache: Dict[Any, Any] = {}
    self._param_cache: Dict[Any, Any] = {}

  _mesh = staticmethod(shd.local_data_mesh)

  @classmethod
  def from_pretrained(cls, name: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                      allow_cast: bool = False, **model_args) -> 'Pipeline':
    """A released model by name (``var_jax.hub.RELEASES``: ``'var_d16'``, ``'L-2-10'``, ``'bigr_L_d24'`` ...),
    its generator and tokenizer files fetched into the Hugging Face hub cache (``cache_dir``, else
    ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``: cached files only) at ``revision`` (or ``name@revision``), then loaded
    with ``from_torch``. ``model_args`` update the table's ``ModelArgs`` fields (and pass ``from_torch``'s
    options, e.g. ``patch_nums`` for VAR)."""
    from var_jax import hub
    r = hub.release(name)
    if r.kind != cls.family:
      raise ValueError(f'{name!r} is a released {r.kind} file, not a {cls.family} model; {cls.__name__} loads: '
                       f'{" ".join(hub.names(cls.family))}')
    files = hub.resolve(name, revision=revision, cache_dir=cache_dir)
    return cls.from_torch(files.tokenizer, files.model, allow_cast=allow_cast, **{**files.model_args, **model_args})

  @property
  def num_classes(self) -> int:
    raise NotImplementedError

  def identity(self) -> Dict[str, Any]:
    """What the model is, for a record that must tell two models apart (a sample folder's plan,
    ``eval.protocol``): its family, the fields of every ``*_config`` it holds, and a SHA-256 over every array of
    every ``*_variables`` set it holds (path, dtype, shape and bytes; reads each weight once, about a second per
    GB). Two loads of the same weights (from any file layout or path) give the same identity."""
    import dataclasses
    import hashlib
    out: Dict[str, Any] = {'family': self.family}
    h = hashlib.sha256()
    for name in sorted(vars(self)):
      value = vars(self)[name]
      if name.endswith('_config') and dataclasses.is_dataclass(value):
        out[name] = dataclasses.asdict(value)
      elif name.endswith('_variables') and not name.startswith('_'):
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
          a = np.ascontiguousarray(np.asarray(leaf))
          h.update(f'{name}{jax.tree_util.keystr(path)}:{a.dtype.str}{a.shape};'.encode())
          h.update(a.tobytes())
    out['weights'] = 'sha256:' + h.hexdigest()
    return out

  def _variables(self, which: str, dtype):
    """The variable set ``which`` for compute dtype ``dtype`` (cast where the family computes in it)."""
    raise NotImplementedError

  def _params(self, which: str, dtype=jnp.float32, mesh=None):
    """``_variables`` cast and placed (replicated over ``mesh``) once per (dtype, mesh), then reused."""
    dtype = jnp.float32 if which in self.float32_parts else dtype
    key = (which, jnp.dtype(dtype).name, mesh)
    if key not in self._param_cache:
      v = self._variables(which, dtype)
      self._param_cache[key] = v if mesh is None else jax.device_put(v, shd.replicated(mesh))
    return self._param_cache[key]

  def _cached(self, key, build: Callable[[], Any]):
    if key not in self._jit_cache:
      self._jit_cache[key] = build()
    return self._jit_cache[key]

  def _apply(self, fn, which: str, arrays: Sequence, shard: bool = True):
    """``fn(params of which, *arrays)``, the batch (axis 0 of every array) sharded over the local devices."""
    mesh = self._mesh() if shard else None
    if mesh is None:
      return fn(self._params(which), *arrays)
    n = arrays[0].shape[0]
    size = -(-n // mesh.devices.size) * mesh.devices.size
    data = _data_sharding(mesh)
    out = fn(self._params(which, mesh=mesh), *[jax.device_put(_pad(a, size), data) for a in arrays])
    return out if size == n else jax.tree.map(lambda a: a[:n], out)

  def _batch_labels(self, labels, batch: int, default: Optional[int] = None) -> jax.Array:
    return batch_labels(labels, batch, self.num_classes, default)

  def _sample_inputs(self, labels, rng, num_samples=None, sample_ids=None) -> Tuple[np.ndarray, jax.Array]:
    """(labels (N,) int32, keys (N,)): labels resolved (None: random classes), key i = fold_in(rng, id_i)."""
    rng = as_key(rng)
    lab = resolve_labels(labels, rng, num_samples, self.num_classes)
    return lab, per_sample_keys(rng, lab.shape[0], sample_ids)

  def _sample_batches(self, settings, build: Callable[[Any], Callable], per_sample: Sequence, dtype,
                      batch_size: Optional[int], shard: bool, extra_parts: Sequence = ()) -> Tuple[np.ndarray, ...]:
    """Run ``build(dtype)`` — ``fn(*params of parts, *params of extra_parts, *per_sample) -> (a, b)`` — over
    ``per_sample`` (pytrees with the samples on axis 0: labels, keys, ...) in compiled batches of ``batch_size`` (the
    last one padded, so one compilation per ``settings`` serves all; rounded up to a multiple of the device count
    when sharded). ``extra_parts``: (pipeline, part) pairs of another pipeline's variables (e.g. a drafter's)."""
    n = jax.tree.leaves(per_sample)[0].shape[0]
    bs = int(batch_size or n)
    if bs < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    mesh = self._mesh() if shard else None
    if mesh is not None:
      bs = -(-bs // mesh.devices.size) * mesh.devices.size
    dtype = parse_dtype(dtype)
    params = tuple(self._params(w, dtype, mesh) for w in self.parts)
    params += tuple(p._params(w, dtype, mesh) for p, w in extra_parts)

    def compile_():
      if mesh is None:
        return jax.jit(build(dtype))
      rep, data = shd.replicated(mesh), _data_sharding(mesh)
      return jax.jit(build(dtype), in_shardings=(rep,) * len(params) + (data,) * len(per_sample),
                     out_shardings=(data, data))

    fn = self._cached(('sample', settings, bs, jnp.dtype(dtype).name, mesh), compile_)
    outs = []
    for start in range(0, n, bs):
      m = min(bs, n - start)
      batch = jax.tree.map(lambda a: _pad(a[start:start + m], bs), list(per_sample))
      outs.append([np.asarray(o)[:m] for o in fn(*params, *batch)])
    return tuple(np.concatenate(o) for o in zip(*outs))


class BinaryLatentPipeline(Pipeline):
  """A generator over the bits of a binary autoencoder (BAE): ELM and BiGR. Images are NHWC float32 in [0, 1];
  bits are NHWC (B, h, w, K) uint8 (the reference's (B, K, h, w) transposed), or (B, N = h*w, K) in raster order."""

  parts = ('bae', 'model')
  float32_parts = ('bae',)                 # the BAE always decodes in float32
  model_attr: str = ''                     # the attribute holding the generator's variables

  def __init__(self, bae_config: BAEConfig, model_config, bae_variables: Mapping[str, Any],
               model_variables: Mapping[str, Any]):
    latent_size, bits_needed, needs = self._latent(model_config)
    if bae_config.codebook_size != bits_needed:
      raise ValueError(f'the BAE has K={bae_config.codebook_size} bits per cell; {needs}')
    super().__init__()
    self.bae_config = bae_config
    self.latent_size = latent_size
    self.image_size = latent_size * bae_config.downsample
    self.bae = BinaryAutoEncoder(bae_config)
    self.bae_variables = jax.tree.map(jnp.asarray, dict(bae_variables))
    self._set_model(model_config, dict(model_variables))

  @staticmethod
  def _latent(model_config) -> Tuple[int, int, str]:
    """(grid side, bits per cell the generator models, what it needs: for the error when the BAE differs)."""
    raise NotImplementedError

  def _set_model(self, model_config, model_variables: Dict[str, Any]):
    raise NotImplementedError

  def set_model_variables(self, model_variables: Mapping[str, Any]):
    """Replace the generator's variables by others of the same shapes (the compiled samplers are kept), e.g. a
    training run's params at each sample step."""
    setattr(self, self.model_attr, jax.tree.map(jnp.asarray, dict(model_variables)))
    self._param_cache.clear()

  @property
  def bits_per_cell(self) -> int:
    return self.bae_config.codebook_size

  @classmethod
  def from_checkpoint(cls, run_dir, *, allow_cast: bool = False, **model_args) -> 'BinaryLatentPipeline':
    """A training run directory of this family (``python -m var_jax.train`` with an elm_* / bigr config; local or
    remote): its ``model_args.json`` names the exported generator (``model.pth`` / ``bigr.pt`` / ``.safetensors``),
    the reference ``ModelArgs`` that reload it and the tokenizer (``bae_file``: the random-init ``binaryae.th``
    exported beside it, or the ``config.bae_ckpt`` the run used) with its trained config, so the pipeline draws
    images at the run's size. ``model_args`` update the json's (e.g. ``infer_steps``). A run of the other family,
    or a directory without ``model_args.json``, is a ValueError saying so."""
    run = read_bits_run(run_dir)
    run.check_family(cls.family, f'{_RUN_FAMILIES[cls.family][0]} run ({cls.__name__}.from_checkpoint)')
    if not fileio.isfile(run.bae_file):
      raise FileNotFoundError(f'{run.info_file}: its bae_file {run.bae_file!r} is neither in {os.fspath(run_dir)} '
                              f'nor at that path')
    pipe = cls.from_torch(run.bae_file, run.model_file, bae_overrides=run.bae_config, allow_cast=allow_cast,
                          **{**run.model_args, **model_args})
    run.check_image_size(pipe)
    return pipe

  @staticmethod
  def _read_bae(bae_path) -> 'BAEFile':
    """Read ``binaryae*.th`` (``ae.``-prefixed or plain) and infer its config; errors name the file. Loaders call
    this before reading the generator, so a bad BAE file is reported as such."""
    if isinstance(bae_path, BAEFile):
      return bae_path
    what = os.fspath(bae_path)
    sd = load_state_dict(bae_path, what='BAE checkpoint')      # errors name the file as the BAE checkpoint
    with named_mismatch(bae_path):
      own, _ = ibae.split_bae_state_dict(sd, what=what)
      return BAEFile(what, own, ibae.bae_config_from_state_dict(own))

  @classmethod
  def _load_bae(cls, bae_path, latent_size: int, overrides: Optional[Dict[str, Any]] = None, allow_cast: bool = False):
    """(config, variables) of ``binaryae*.th`` (a path or ``_read_bae``'s result); its ``resolution`` (only naming
    the attention levels) is the image size that the generator's grid implies unless ``overrides`` give one."""
    f = cls._read_bae(bae_path)
    with named_mismatch(f.path):
      kw = {'resolution': latent_size * f.config.downsample, **(overrides or {})}
      cfg = ibae.bae_config_from_state_dict(f.own, **kw)
      return cfg, ibae.import_bae(f.own, cfg, allow_cast=allow_cast)

  @staticmethod
  def _init_bae(bae_config: BAEConfig, rng):
    s = bae_config.resolution
    return jax.jit(functools.partial(BinaryAutoEncoder(bae_config).init, train=False))(
        rng, jnp.zeros((1, s, s, bae_config.in_channels), jnp.float32))

  def _save_bae(self, bae_path):
    if bae_path:
      ibae.save_bae(jax.device_get(self.bae_variables), self.bae_config, os.fspath(bae_path))

  # ------------------------------------------------------------------ checks
  def _check_images(self, images, what='images') -> jax.Array:
    return check_images(images, self.bae_config.in_channels, self.image_size,
                        f'{type(self).__name__[:-len("Pipeline")]} grid {self.latent_size} x BAE downsample '
                        f'{self.bae_config.downsample}',
                        what, ' in [0, 1]', lo=0.0, hi=1.0)

  def _check_bits(self, bits, what='bits') -> jax.Array:
    """(B, h, w, K) or (B, N, K) 0/1 -> (B, h, w, K) uint8; any other value (NaN, 2, 0.5, -1) is an error."""
    b = jnp.asarray(bits)
    g, k = self.latent_size, self.bits_per_cell
    if b.ndim == 3 and b.shape[1:] == (g * g, k):
      b = b.reshape(b.shape[0], g, g, k)
    if b.ndim != 4 or b.shape[1:] != (g, g, k):
      raise ValueError(f'{what} must be (B, {g}, {g}, {k}) (or (B, {g * g}, {k})), got shape {tuple(b.shape)}')
    check_token_ids(b, 2, what)
    return b.astype(jnp.uint8)

  # ------------------------------------------------------------------ the autoencoder
  def _bae_fn(self, name: str):
    bae, ds, k = self.bae, self.bae_config.downsample, self.bits_per_cell

    def bernoulli(v, x, keys):
      u = jax.vmap(lambda kk: jax.random.uniform(kk, (x.shape[1] // ds, x.shape[2] // ds, k)))(keys)
      return bae.apply(v, x, 'bernoulli', None, u, method=BinaryAutoEncoder.bits)

    fns = {'encode_threshold': lambda v, x: bae.apply(v, x, method=BinaryAutoEncoder.bits),
           'encode_bernoulli': bernoulli,
           'decode': lambda v, bits: bae.apply(v, bits, method=BinaryAutoEncoder.decode)}
    return self._cached(name, lambda: jax.jit(fns[name]))

  def encode(self, images, mode: str = 'threshold', rng=None, *, shard: bool = True) -> jax.Array:
    """Images NHWC in [0, 1] -> bits (B, h, w, K) uint8.

    ``mode='threshold'``: ``p > 0.5`` (the reference ``encode()`` with ``deterministic``: what the generators are
    evaluated and probed on). ``mode='bernoulli'``: ``u < p`` (how the references tokenise for training); ``rng`` a
    PRNG key or int seed, image i draws from ``fold_in(rng, i)`` (independent of the batch composition).
    """
    x = self._check_images(images)
    if mode == 'threshold':
      return self._apply(self._bae_fn('encode_threshold'), 'bae', [x], shard)
    if mode == 'bernoulli':
      if rng is None:
        raise ValueError("mode='bernoulli' needs rng (a PRNG key or an int seed)")
      keys = per_sample_keys(rng, x.shape[0])
      return self._apply(self._bae_fn('encode_bernoulli'), 'bae', [x, keys], shard)
    raise ValueError(f"mode must be 'threshold' or 'bernoulli', got {mode!r}")

  def decode(self, bits, *, clip: bool = False, shard: bool = True) -> jax.Array:
    """Bits (B, h, w, K) (or (B, N, K)) -> images NHWC float32 (the reference ``bae.decode(bits, is_bin=True)``).

    A trained BAE decodes to about [0, 1]; the output is clamped only with ``clip`` (the references clamp when they
    write files)."""
    out = self._apply(self._bae_fn('decode'), 'bae', [self._check_bits(bits)], shard)
    return jnp.clip(out, 0.0, 1.0) if clip else out

  def _generate(self, settings: Tuple, labels, rng, noise, clip: bool, dtype, num_samples, sample_ids, batch_size,
                shard) -> Tuple[np.ndarray, np.ndarray]:
    """Keyed generation in compiled batches (``_sampler(settings, dtype, clip)``), or one call with the injected
    ``noise`` of the reference fixtures (``_sample_injected``)."""
    clip = bool(clip)
    if noise is not None:
      return self._sample_injected(labels, settings, noise, clip, dtype)
    lab, keys = self._sample_inputs(labels, rng, num_samples, sample_ids)
    return self._sample_batches((settings, clip), lambda dt: self._sampler(settings, dt, clip), [lab, keys], dtype,
                                batch_size, shard)

  def _decoded(self, clip: bool):
    """``fn(bae_vars, bits (B, h, w, K)) -> images``, clamped with ``clip``: the last step of a sampler."""
    bae = self.bae

    def decode(bae_vars, bits):
      images = bae.apply(bae_vars, bits, method=BinaryAutoEncoder.decode)
      return jnp.clip(images, 0.0, 1.0) if clip else images
    return decode

  def _variables(self, which: str, dtype):
    v = getattr(self, 'bae_variables' if which == 'bae' else self.model_attr)
    return v if which == 'bae' or jnp.dtype(dtype) == jnp.float32 else cast_floating(v, dtype)
