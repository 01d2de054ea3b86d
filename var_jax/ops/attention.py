"""One attention function with the fast kernels behind it: cuDNN flash attention on GPU, the Pallas splash-attention
kernel on TPU (its block-sparse mask skips the fully masked blocks of VAR's block-causal mask), XLA elsewhere.

``attention(q, k, v, scale=, mask=None | BlockCausal(patch_nums), implementation='auto')`` on (B, T, H, Dh) queries
and (B, S, H, Dh) keys/values -> (B, T, H, Dh). The mask is STATIC (a ``BlockCausal`` spec, or None = full
attention), so every kernel can see its structure at trace time.

Implementations:

- ``'xla'``: ``jax.nn.dot_product_attention`` with the dense boolean mask (the numerics VAR always had);
- ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')``; where cuDNN does not take the input
  (float32, head_dim not a multiple of 8 or too large, odd sequence with a mask...) it falls back to XLA with one
  logged warning per shape, never an error;
- ``'splash'``: ``jax.experimental.pallas.ops.tpu.splash_attention`` with the mask padded to the kernel's block
  size (padded keys are masked, padded queries see every real key and are sliced off), q pre-scaled (the kernel has
  no scale), vmapped over the batch; under a multi-device mesh the kernel runs in ``jax.shard_map`` over the batch
  (logical 'activation_batch') and heads (the axis of logical 'qkv'). ``interpret=True`` runs it on any backend
  (Pallas interpret mode; slow, for tests);
- ``'auto'``: by the platform of the mesh being traced for (``jax.sharding.get_abstract_mesh()``: AOT compiles for
  a TPU topology on a CPU host pick TPU), else ``jax.default_backend()``: 'gpu' -> cudnn, 'tpu' -> splash when there
  is a mask (the KV-cache decode of a few queries stays on XLA), anything else -> xla.

An explicit 'cudnn' on a non-GPU platform or 'splash' on a non-TPU platform (without ``interpret``) is an error
naming the platform: a config that asks for a kernel should not silently run without it; use 'auto' to be portable.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128          # the kernel's tile (q and kv): TPU lanes are 128 wide

_log = logging.getLogger(__name__)


def level_ids(patch_nums) -> np.ndarray:
  """Scale index of every position, (L,) int (the reference buffer ``lvl_1L``)."""
  return np.concatenate([np.full((p * p,), i, np.int64) for i, p in enumerate(patch_nums)])


def block_causal_mask(patch_nums) -> np.ndarray:
  """(L, L) bool, True where query i may attend key j: level(j) <= level(i)."""
  d = level_ids(patch_nums)
  return d[:, None] >= d[None, :]


@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """VAR's static scale-causal mask: a token of scale k sees every token of scales <= k (hashable: a static arg)."""
  patch_nums: Tuple[int, ...]

  def dense(self, t: int, s: int) -> np.ndarray:
    """The (t, s) top-left corner of the (L, L) mask."""
    m = block_causal_mask(self.patch_nums)
    if t > m.shape[0] or s > m.shape[1]:
      raise ValueError(f'BlockCausal{self.patch_nums}: sequence ({t}, {s}) is longer than L={m.shape[0]}')
    return m[:t, :s]


def validate_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation must be one of {IMPLEMENTATIONS}, got {name!r}')
  return name


def current_platform() -> str:
  """The platform being traced for: the context mesh's devices if there is one, else the default backend."""
  am = jax.sharding.get_abstract_mesh()
  dev = None if am.empty else getattr(am, 'abstract_device', None)
  return dev.platform if dev is not None and getattr(dev, 'platform', None) else jax.default_backend()


def resolve(implementation: str, has_mask: bool, platform: Optional[str] = None, interpret: bool = False) -> str:
  """The implementation 'auto' stands for on ``platform`` (default: ``current_platform()``); checks explicit ones."""
  validate_implementation(implementation)
  platform = platform or current_platform()
  if implementation == 'auto':
    return {'gpu': 'cudnn', 'cuda': 'cudnn', 'tpu': 'splash' if has_mask else 'xla'}.get(platform, 'xla')
  if implementation == 'cudnn' and platform not in ('gpu', 'cuda'):
    raise ValueError(f"attention implementation 'cudnn' needs a GPU, but the platform is {platform!r} "
                     "(use 'auto' or 'xla')")
  if implementation == 'splash' and platform != 'tpu' and not interpret:
    raise ValueError(f"attention implementation 'splash' needs a TPU, but the platform is {platform!r} "
                     "(use 'auto' or 'xla'; interpret=True runs the kernel in Pallas interpret mode)")
  return implementation


def attention(q, k, v, *, scale: float, mask: Optional[BlockCausal] = None, implementation: str = 'auto',
              interpret: bool = False, block_size: int = SPLASH_BLOCK):
  """Softmax attention (B, T, H, Dh) x (B, S, H, Dh) -> (B, T, H, Dh); ``mask`` static (None = full)."""
  if mask is not None and not isinstance(mask, BlockCausal):
    raise TypeError(f'attention: mask must be None or a BlockCausal spec, got {type(mask).__name__}')
  impl = resolve(implementation, mask is not None, interpret=interpret)
  t, s = q.shape[1], k.shape[1]
  dense = None if mask is None else mask.dense(t, s)
  if impl == 'splash':
    return _splash(q, k, v, scale, dense, block_size, interpret)
  m = None if dense is None else jnp.asarray(dense)[None, None]
  if impl == 'cudnn':
    why = _cudnn_unsupported(q, dense)
    if why is None:
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, implementation='cudnn')
      except (NotImplementedError, ValueError, RuntimeError) as e:   # cuDNN's own checks run at trace time
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    _warn_fallback(q.shape, k.shape, str(q.dtype), why)
  return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale)


def _cudnn_unsupported(q, dense) -> Optional[str]:
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f'dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)'
  if q.shape[-1] % 8:
    return f'head_dim {q.shape[-1]} is not a multiple of 8'
  if dense is not None and (dense.shape[0] % 2 or dense.shape[1] % 2):
    return f'sequence {dense.shape} with a mask must be even'
  return None


@functools.lru_cache(maxsize=None)
def _warn_fallback(q_shape, k_shape, dtype, why):
  _log.warning('attention: cudnn does not take q%s k%s %s (%s); using XLA', q_shape, k_shape, dtype, why)


# ----------------------------------------------------------------------------- splash (TPU)
def _pad_to(n: int, b: int) -> int:
  return -(-n // b) * b


def padded_mask(dense: Optional[np.ndarray], t: int, s: int, block_q: int, block_kv: int) -> np.ndarray:
  """(Tp, Sp) bool: ``dense`` (or all True) in the top-left, padded keys masked, padded queries seeing every real
  key (no empty rows: their outputs are sliced off, but must stay finite for the backward pass)."""
  tp, sp = _pad_to(t, block_q), _pad_to(s, block_kv)
  out = np.zeros((tp, sp), bool)
  out[:t, :s] = True if dense is None else dense
  out[t:, :s] = True
  return out


def block_mask_counts(mask: np.ndarray, block_q: int, block_kv: int) -> dict:
  """Counts of the (block_q, block_kv) tiles of a padded mask: 'empty' (skipped), 'partial', 'full'."""
  tq, tk = mask.shape[0] // block_q, mask.shape[1] // block_kv
  tiles = mask.reshape(tq, block_q, tk, block_kv).sum(axis=(1, 3))
  return {'empty': int((tiles == 0).sum()), 'partial': int(((tiles > 0) & (tiles < block_q * block_kv)).sum()),
          'full': int((tiles == block_q * block_kv).sum())}


def _block_sizes(bq: int, bkv: int):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                       block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def make_splash_kernel(mask: np.ndarray, heads: int, block_q: int, block_kv: int, interpret: bool = False):
  """The splash MHA kernel for a padded (Tp, Sp) mask shared by ``heads`` heads (one device's heads)."""
  return _kernel_cached(mask.tobytes(), mask.shape, heads, block_q, block_kv, interpret)


@functools.lru_cache(maxsize=64)
def _kernel_cached(mask_bytes, shape, heads, bq, bkv, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  m = np.frombuffer(mask_bytes, bool).reshape(shape)
  mh = sa.MultiHeadMask([sa.NumpyMask(m) for _ in range(heads)])
  return sa.make_splash_mha(mh, block_sizes=_block_sizes(bq, bkv), head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _mesh_specs(b: int, h: int):
  """(PartitionSpec for (B, T, H, Dh), batch shards, head shards) under the context mesh; None without one."""
  am = jax.sharding.get_abstract_mesh()
  if am.empty or am.size <= 1:
    return None
  sizes = dict(zip(am.axis_names, am.axis_sizes))

  def axes(logical_name, n):
    try:
      spec = nn.logical_to_mesh_axes((logical_name,))[0]
    except Exception:   # no rules in context: nothing is sharded this way
      spec = None
    names = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    names = tuple(a for a in names if a in sizes and sizes[a] > 1)
    shards = math.prod(sizes[a] for a in names)
    if not names or n % shards:
      return None, 1
    return (names[0] if len(names) == 1 else names), shards

  batch, nb = axes('activation_batch', b)
  heads, nh = axes('qkv', h)
  return jax.sharding.PartitionSpec(batch, None, heads, None), nb, nh


def _splash(q, k, v, scale, dense, block, interpret):
  b, t, h, dh = q.shape
  s = k.shape[1]
  bq = bkv = block
  pm = padded_mask(dense, t, s, bq, bkv)
  if scale != 1.0:
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)

  def run(q, k, v):
    kernel = make_splash_kernel(pm, q.shape[2], bq, bkv, interpret)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))          # (B, H, T, Dh)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pm.shape[0] - t), (0, 0)))
    kh = jnp.pad(kh, ((0, 0), (0, 0), (0, pm.shape[1] - s), (0, 0)))
    vh = jnp.pad(vh, ((0, 0), (0, 0), (0, pm.shape[1] - s), (0, 0)))
    out = jax.vmap(kernel)(qh, kh, vh)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)

  specs = _mesh_specs(b, h)
  if specs is None:
    return run(q, k, v)
  spec = specs[0]
  return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
