"""A fake Google Cloud Storage for tests: ``gcp-storage-emulator`` (in memory) served on localhost, so that real
``gs://`` paths go through the real remote code paths — ``etils.epath`` -> fsspec/gcsfs (``STORAGE_EMULATOR_HOST``)
and orbax -> tensorstore's ``gcs`` kvstore driver (``TENSORSTORE_GCS_HTTP_URL``) — with no network and no
credentials. ``FakeGCS.env`` is the environment a subprocess needs to reach it."""
from __future__ import annotations

import logging
import os
import socketserver

from tests_helpers import free_port


def _add_generation_headers():
  """The emulator's media downloads lack the ``x-goog-generation`` header real GCS sends, which tensorstore needs to
  read an object it will update (orbax's OCDBT manifest: 'Malformed StorageGeneration'); add it (once)."""
  from http import HTTPStatus
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  if getattr(objects, '_var_jax_patched', False):
    return

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj['metageneration'])
  for _, methods in server.HANDLERS:
    for m, fn in list(methods.items()):
      if fn is original:
        methods[m] = download
  objects.download = download      # objects.get (?alt=media) calls it too
  objects._var_jax_patched = True   # pylint: disable=protected-access


class FakeGCS:
  """``with FakeGCS('bkt') as gcs:`` serves bucket ``bkt``; ``gcs.env`` for subprocesses, ``gcs.activate()`` for
  this process (sets the variables and drops gcsfs's cached filesystems)."""

  def __init__(self, bucket: str = 'var-jax-test'):
    from gcp_storage_emulator.server import create_server
    logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)   # every 404 probe is logged as an error
    _add_generation_headers()
    self.bucket = bucket
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.env = {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
                'GOOGLE_CLOUD_PROJECT': 'var-jax-test'}
    self._server = create_server('127.0.0.1', self.port, in_memory=True, default_bucket=bucket)

  def __enter__(self):
    # clients that close a connection early (tensorstore, gcsfs) make the stdlib server print a traceback
    self._handle_error = socketserver.BaseServer.handle_error
    socketserver.BaseServer.handle_error = lambda *a: None
    self._server.start()
    return self

  def __exit__(self, *exc):
    self._server.stop()
    socketserver.BaseServer.handle_error = self._handle_error

  def activate(self, monkeypatch):
    for k, v in self.env.items():
      monkeypatch.setenv(k, v)
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()

  def root(self, *parts: str) -> str:
    return '/'.join([f'gs://{self.bucket}', *parts])
