"""Device mesh and sharding: the one module that maps logical axis names onto mesh axes.

Every parameter carries logical axis names (``var_jax.models.layers``: 'embed', 'mlp', 'qkv', 'heads', 'adaln',
'vocab', 'classes', 'length', 'latent', 'conv_in', 'conv_out', 'norm'); activations are constrained with
'activation_batch', 'activation_length', 'activation_embed'. ``LOGICAL_AXIS_RULES`` maps them onto the mesh axes
('data', 'fsdp', 'tensor'): parameters and optimizer state are sharded FSDP-style over 'fsdp' (and their
matmul-output dimension over 'tensor'), the batch over data x fsdp. Linen's logical constraints only act under
``with jax.set_mesh(mesh), nn.logical_axis_rules(rules):`` on a mesh of ``AxisType.Auto`` axes (``mesh_context``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_AXIS_RULES: Tuple[Tuple[str, Any], ...] = (
    # activations
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    # parameters
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('qkv', 'tensor'),
    ('adaln', 'tensor'),
    ('vocab', 'tensor'),
    ('heads', None),
    ('classes', None),
    ('length', None),
    ('latent', None),
    ('conv_in', None),
    ('conv_out', None),
    ('norm', None),
)


def mesh_shape(axis_sizes: Dict[str, int], num_devices: int) -> Tuple[int, ...]:
  """Sizes for ('data', 'fsdp', 'tensor'); one of them may be -1 ('the rest')."""
  sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(axis_sizes: Dict[str, int], devices: Optional[Sequence[Any]] = None, num_slices: int = 1) -> Mesh:
  """A mesh over all (or the given) devices with Auto axes ('data', 'fsdp', 'tensor'), laid out on the physical
  topology (``jax.make_mesh``). ``num_slices`` > 1 (multislice TPU over DCN): the slices split the 'data' axis
  (``mesh_utils.create_hybrid_device_mesh``), so only data-parallel gradients cross the slow links."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(dict(axis_sizes), len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))}: data={shape[0]} must be a multiple of the '
                       f'{num_slices} slices (the slices split the data axis)')
    from jax.experimental import mesh_utils
    ici = (shape[0] // num_slices,) + shape[1:]
    grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices,) + (1,) * (len(shape) - 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=types)
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  if len({d.platform for d in devices}) == 1 and devices[0].platform == 'tpu':
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)   # ICI-aware order
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_from_config(rules=None) -> Tuple[Tuple[str, Any], ...]:
  if not rules:
    return LOGICAL_AXIS_RULES
  return tuple((str(k), (tuple(v) if isinstance(v, (list, tuple)) else v)) for k, v in rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Activate the mesh and the logical rules (what switches Linen's logical constraints on)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class MeshDivisibilityError(ValueError):
  """A parameter dimension is split over mesh axes whose size does not divide it (named, with the mesh sizes that
  would); raised before anything is placed or compiled."""


def check_divisible(abstract_tree, shardings):
  """Every dimension of every leaf divides into the mesh axes its sharding splits it over, else one
  ``MeshDivisibilityError`` naming the first such leaf, the dimension, and the largest split that divides all."""
  bad, sizes = [], {}
  flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
    if not isinstance(s, NamedSharding):
      continue
    for dim, (n, axes) in enumerate(zip(getattr(x, 'shape', ()), tuple(s.spec) + (None,) * len(x.shape))):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      k = math.prod(s.mesh.shape[a] for a in axes)
      if axes:
        sizes.setdefault(axes, []).append(n)
      if k > 1 and n % k:
        bad.append((jax.tree_util.keystr(path), dim, tuple(x.shape), axes, k))
  if bad:
    name, dim, shape, axes, k = bad[0]
    g = math.gcd(*sizes[axes])
    fits = max(d for d in range(1, k + 1) if k % d == 0 and g % d == 0)
    err = MeshDivisibilityError(
        f'{len(bad)} parameter(s) do not split over the mesh: {name} {shape} has dim {dim} of {shape[dim]} split '
        f'{k} ways over mesh axis {"x".join(axes)}; the largest split of {"x".join(axes)} dividing every such dim '
        f'is {fits}: e.g. --config.mesh.{axes[-1]}={fits} --config.mesh.data=-1')
    err.axes, err.fits = axes, fits
    raise err


def logical_to_shardings(boxed_abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """A tree holding ``nn.Partitioned`` boxes (e.g. ``jax.eval_shape`` of a Linen init) -> NamedShardings of the
  unboxed tree; unannotated leaves are replicated. A dimension the mesh cannot split evenly is a
  ``MeshDivisibilityError`` (``check_divisible``)."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  check_divisible(nn.unbox(boxed_abstract_tree), shardings)
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_size_ok(global_batch: int, mesh: Mesh):
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise ValueError(f'global batch size {global_batch} is not divisible by data x fsdp = {n}')


def host_local_to_global(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Each process's slice of the batch -> one global jax.Array per field, sharded over data x fsdp."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def local_data_mesh() -> Optional[Mesh]:
  """A 1-D ``'data'`` mesh over this process's devices (None with one device): what the pipelines shard sampling
  and inference batches over."""
  devs = jax.local_devices()
  if len(devs) <= 1:
    return None
  return Mesh(np.asarray(devs).reshape(len(devs)), ('data',), axis_types=(AxisType.Auto,))


def to_host(tree):
  """A (sharded, possibly multi-process) pytree as host numpy arrays on every process: an all-gather across
  processes when there are several (every process must call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
