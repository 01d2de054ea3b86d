"""Metric logging (process 0 only): stdout, ``<workdir>/metrics.jsonl`` and TensorBoard event files in
``<workdir>/tensorboard`` — scalars (losses, per-scale curves as ``train/loss_scale/03``, learning rate, images/s,
MFU), images (sample grids, reconstructions), histograms (codebook usage) and the config as text.

A remote workdir (``gs://...``; anything ``fileio.is_remote`` calls remote): objects cannot be appended to, so both
files are written in a local temporary directory and uploaded whole (through ``var_jax.fileio``) at every ``sync()``
— the loop calls it after each checkpoint save and sample step — and at ``close()``.

Resume: ``MetricWriter(workdir, start_step=s)`` drops the ``metrics.jsonl`` records of steps after ``s`` (written
by an earlier run after its last checkpoint; the file is rewritten atomically) and makes TensorBoard discard the
events of those steps (the event file starts with a purge at step ``s + 1``), so that each step appears once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import time
from typing import Dict, Iterator, List, Mapping, Optional

import jax
import numpy as np
from absl import logging

from var_jax import fileio

JSONL = 'metrics.jsonl'
TB_DIR = 'tensorboard'

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


def compiled_flops(jitted, *args) -> Optional[float]:
  """FLOPs of one call of ``jitted(*args)`` from XLA's cost analysis of the lowered (unpartitioned, so global)
  program, without compiling it; None when the backend gives none. For tasks without an analytic count. XLA counts
  the body of a loop (``lax.scan``) once, whatever its trip count."""
  try:
    cost = jitted.lower(*args).cost_analysis()
  except Exception as e:  # noqa: BLE001 - an estimate only: never stop training for it
    logging.warning('no FLOP count for the MFU estimate: %s', e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


@dataclasses.dataclass
class Summaries:
  """What a task's periodic output step produced (on process 0; ``None`` elsewhere): ``images`` {tag: uint8
  (H, W, C)} (also written as PNG ``files``), ``histograms`` {tag: values}, ``scalars`` {split: {name: float}}
  (``metrics.jsonl`` records of that split and TensorBoard scalars ``split/name``, e.g. the digits quality score)."""
  images: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  histograms: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  files: List[str] = dataclasses.field(default_factory=list)
  scalars: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)


def _vector_patterns(vector_metrics: Optional[Mapping[str, str]]):
  """``{'loss_per_scale': 'loss_scale{}'}`` -> [(re 'loss_scale(\\d+)', 'loss_scale')]: the per-index scalars the
  loop makes of a task's vector metrics, grouped in TensorBoard as ``<split>/loss_scale/03``."""
  out = []
  for fmt in (vector_metrics or {}).values():
    head, _, tail = fmt.partition('{}')
    out.append((re.compile(re.escape(head) + r'(\d+)' + re.escape(tail) + '$'), (head + tail).strip('_')))
  return out


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drop the records of steps > ``last_step`` (and unreadable lines, e.g. one cut by a kill) from the local JSON
  lines file ``path``, rewriting it atomically; -> the number of lines dropped."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        ok = int(rec.get('step', 0)) <= last_step
      except (ValueError, TypeError, AttributeError):
        ok = False
      if ok:
        keep.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    fileio.atomic_write_text(path, ''.join(keep))
  return dropped


class MetricWriter:
  """``write(step, {name: float}, prefix)`` -> a ``metrics.jsonl`` line and TensorBoard scalars ``prefix/name``;
  ``image`` / ``histogram`` / ``text`` / ``summaries`` -> TensorBoard only. Process 0 writes (``enabled``).

  ``start_step``: the step the run starts (or resumes) from; records and events of later steps are dropped (see the
  module doc). ``vector_metrics``: the task's ``{metric: 'name{}'}`` formats; their per-index scalars go to
  TensorBoard as ``prefix/name/NN`` (one group per metric), to the JSON lines under their flat names."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None, start_step: Optional[int] = None,
               vector_metrics: Optional[Mapping[str, str]] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = os.fspath(workdir)
    self.remote = fileio.is_remote(self.workdir)
    self._vectors = _vector_patterns(vector_metrics)
    self._tb = None
    self._jsonl = None
    self._local = None
    if not self.enabled:
      return
    if self.remote:
      self._local = tempfile.mkdtemp(prefix='var_jax_metrics_')
      remote_jsonl = fileio.path(self.workdir) / JSONL
      if remote_jsonl.exists():
        with open(os.path.join(self._local, JSONL), 'wb') as f:
          f.write(remote_jsonl.read_bytes())
    else:
      self._local = self.workdir
      os.makedirs(self._local, exist_ok=True)
    jsonl = os.path.join(self._local, JSONL)
    if start_step is not None:
      n = truncate_jsonl(jsonl, int(start_step))
      if n:
        logging.info('%s: dropped %d record(s) after step %d (written after the last checkpoint)',
                     os.path.join(self.workdir, JSONL), n, start_step)
    self._jsonl = open(jsonl, 'a')
    try:
      from tensorboardX import SummaryWriter
      # unique and in run order: tensorboardX names files by the second and host only
      self._tb = SummaryWriter(os.path.join(self._local, TB_DIR), filename_suffix=f'.{time.time_ns()}.{os.getpid()}',
                               purge_step=None if start_step is None else int(start_step) + 1)
    except ImportError:   # pragma: no cover - tensorboardX is a dependency
      logging.warning('tensorboardX is not installed: no TensorBoard event files')
    if self.remote:
      self.sync()         # the truncated metrics.jsonl replaces the remote one at once

  def _tag(self, prefix: str, name: str) -> str:
    for pattern, group in self._vectors:
      m = pattern.match(name)
      if m:
        return f'{prefix}/{group}/{int(m.group(1)):02d}'
    return f'{prefix}/{name}'

  def write(self, step: int, metrics: Dict[str, float], prefix: str = 'train'):
    if not self.enabled:
      return
    rec = {'step': int(step), 'split': prefix, 'time': time.time()}
    rec.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(rec) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(self._tag(prefix, k), float(v), int(step))
      self._tb.flush()

  def image(self, step: int, tag: str, image):
    """A uint8 (H, W, C) (or (H, W)) image, e.g. a sample grid."""
    if self.enabled and self._tb is not None:
      a = np.asarray(image)
      self._tb.add_image(tag, a, int(step), dataformats='HWC' if a.ndim == 3 else 'HW')

  def histogram(self, step: int, tag: str, values):
    if self.enabled and self._tb is not None:
      self._tb.add_histogram(tag, np.asarray(values, np.float64).reshape(-1), int(step))

  def text(self, step: int, tag: str, text: str):
    """Markdown text (a JSON config shows best as ``'```\\n' + json + '\\n```'``)."""
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))

  def summaries(self, step: int, s: Optional[Summaries]):
    """A task's periodic ``Summaries`` (None: nothing) to TensorBoard (and its scalars to the JSON lines too), then
    ``sync()``."""
    if s is None or not self.enabled:
      return
    for tag, img in s.images.items():
      self.image(step, tag, img)
    for tag, v in s.histograms.items():
      self.histogram(step, tag, v)
    for split, values in s.scalars.items():
      self.write(step, values, prefix=split)
    self.sync()

  def sync(self):
    """Flush; for a remote workdir upload ``metrics.jsonl`` and the event files (whole: objects do not append)."""
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    if not self.remote or self._local is None:
      return
    out = fileio.path(self.workdir)
    out.mkdir(parents=True, exist_ok=True)
    for rel in self._local_files():
      with open(os.path.join(self._local, rel), 'rb') as f:
        data = f.read()
      target = out / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      fileio.atomic_write_bytes(target, data)

  def _local_files(self) -> List[str]:
    files = [JSONL] if os.path.exists(os.path.join(self._local, JSONL)) else []
    tb = os.path.join(self._local, TB_DIR)
    if os.path.isdir(tb):
      files += [os.path.join(TB_DIR, n) for n in sorted(os.listdir(tb)) if os.path.isfile(os.path.join(tb, n))]
    return files

  def close(self):
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.close()
    if self._jsonl:
      self._jsonl.close()
    self._tb = self._jsonl = None
    if self.remote and self._local:
      try:
        self.sync()
      finally:
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None


# ----------------------------------------------------------------------------- reading event files back
def read_event_file(path) -> Iterator:
  """The ``Event`` protos of one TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
  from tensorboardX.proto import event_pb2
  data = fileio.path(path).read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (n,) = struct.unpack('<Q', data[pos:pos + 8])
    start = pos + 12
    if start + n + 4 > len(data):
      break               # a record cut short (the writer still running): stop there
    ev = event_pb2.Event()
    ev.ParseFromString(data[start:start + n])
    yield ev
    pos = start + n + 4


def read_events(logdir) -> Dict[str, List]:
  """{tag: [(step, kind, value)]} over every event file in ``logdir`` (in file-name order, i.e. run order),
  honouring purges as TensorBoard does (a ``SessionLog.START`` at step s hides earlier-written events of steps
  >= s). kind: 'scalar' (float), 'image' (PNG bytes), 'histogram' (the ``HistogramProto``), 'text' (str)."""
  from tensorboardX.proto import event_pb2
  out: Dict[str, List] = {}
  d = fileio.path(logdir)
  for f in sorted(d.iterdir(), key=lambda p: p.name):
    if 'tfevents' not in f.name:
      continue
    for ev in read_event_file(f):
      if ev.HasField('session_log') and ev.session_log.status == event_pb2.SessionLog.START:
        for tag in out:
          out[tag] = [r for r in out[tag] if r[0] < ev.step]
        continue
      if not ev.HasField('summary'):
        continue
      for v in ev.summary.value:
        kind = v.WhichOneof('value')
        if kind == 'simple_value':
          item = ('scalar', float(v.simple_value))
        elif kind == 'image':
          item = ('image', v.image.encoded_image_string)
        elif kind == 'histo':
          item = ('histogram', v.histo)
        elif kind == 'tensor' and v.metadata.plugin_data.plugin_name == 'text':
          item = ('text', v.tensor.string_val[0].decode())
        else:
          item = (kind, None)
        out.setdefault(v.tag, []).append((int(ev.step),) + item)
  return out
