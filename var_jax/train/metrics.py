"""Metric logging: stdout, a JSON-lines file and TensorBoard event files (process 0 only)."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import jax
from absl import logging

# Peak dense bf16 FLOP/s per device, for the MFU estimate (public spec sheets).
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
    'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA GH200': 989e12,
}


def peak_flops_per_device() -> Optional[float]:
  kind = jax.devices()[0].device_kind
  for k, v in PEAK_FLOPS.items():
    if kind.startswith(k) or k in kind:
      return v
  return None


def var_train_flops_per_image(var_config) -> float:
  """Model FLOPs of one training example (forward + backward = 3x forward) of the transformer: matmuls
  (2 x params touched per token) plus block-causal attention (QK^T and AV over the visible keys)."""
  c, d, L = var_config.embed_dim, var_config.depth, var_config.seq_len
  per_token_block = 2 * (3 * c * c + c * c + 2 * c * var_config.mlp_dim)     # qkv, proj, fc1, fc2
  head = 2 * c * var_config.vocab_size
  visible = sum((e) * (e - b) for b, e in var_config.begin_ends)            # keys seen by each scale's queries
  attn = d * 2 * 2 * visible * c                                            # QK^T and AV
  fwd = L * (d * per_token_block + head) + attn
  return 3.0 * fwd


def local_logdir(workdir: str) -> str:
  """Where metrics.jsonl and TensorBoard files go: the workdir itself, or for a remote (gs://) workdir a local
  directory named after it (copy or sync it to the bucket to share)."""
  if '://' not in workdir:
    return workdir
  d = os.path.join(os.path.expanduser('~'), 'var_jax_logs', workdir.split('://', 1)[1].strip('/').replace('/', '_'))
  logging.warning('metrics and TensorBoard files of %s are written locally to %s', workdir, d)
  return d


class MetricWriter:
  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:   # pragma: no cover - tensorboardX is a dependency
        logging.warning('tensorboardX is not installed: no TensorBoard event files')

  def write(self, step: int, metrics: Dict[str, float], prefix: str = 'train'):
    if not self.enabled:
      return
    rec = {'step': int(step), 'split': prefix, 'time': time.time()}
    rec.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f'{prefix}/{k}', float(v), int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
