"""Multi-host start-up and barriers shared by the command lines (``python -m var_jax.train``, ``.sample``,
``.evaluate``, ``.probe``): one environment starts JAX's distributed runtime for all of them.

A manual launch on one or several machines sets ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` on every process; Slurm, Cloud TPU, GKE and Open MPI are detected by jax itself.
"""
from __future__ import annotations

import os
from typing import Optional

# any of these set (and Slurm with more than one task) means a multi-process launch
MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
                 'OMPI_MCA_orte_hnp_uri')
BARRIER_TIMEOUT_S = 24 * 3600     # a barrier waits for the slowest process (e.g. process 0 computing features)
_barriers = [0]                   # barriers passed so far: makes every barrier's id unique


def multihost_requested() -> bool:
  """Whether the environment describes a multi-process launch."""
  return any(os.environ.get(k) for k in MULTIHOST_ENV) and os.environ.get('SLURM_NTASKS', '2') != '1'


def initialize_distributed():
  """jax.distributed.initialize(); jax auto-detects Slurm, Cloud TPU, GKE and Open MPI. For a manual launch set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax itself reads only the first)."""
  import jax
  n, i = os.environ.get('JAX_NUM_PROCESSES'), os.environ.get('JAX_PROCESS_ID')
  if n is not None and i is not None:
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], num_processes=int(n), process_id=int(i))
  else:
    jax.distributed.initialize()


def initialize_from_env(distributed: Optional[bool] = None) -> bool:
  """``initialize_distributed()`` when ``distributed`` (None: when ``multihost_requested()``); call before any jax
  computation. Returns whether it was called."""
  if distributed is None:
    distributed = multihost_requested()
  if distributed:
    initialize_distributed()
  return bool(distributed)


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
  """Wait until every process reaches the barrier ``name`` (a no-op with one process). Uses the coordination
  service (no device collective, so an idle wait does not hit a collective timeout); ``name`` must be the same on
  every process (processes must pass the same barriers in the same order)."""
  import jax
  if jax.process_count() == 1:
    return
  _barriers[0] += 1
  name = f'{name} #{_barriers[0]}'
  from jax._src import distributed as jdist
  client = jdist.global_state.client
  if client is None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(name, int(timeout_s * 1000))
