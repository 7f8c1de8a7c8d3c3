"""A gcp-storage-emulator on 127.0.0.1 that gcsfs (epath's gs://), ArrayRecord's reader and tensorstore reach.

Each client library is pointed at the emulator the way it documents:
gcsfs (etils.epath's gs:// backend without TensorFlow) by STORAGE_EMULATOR_HOST
(FSSPEC_GS_TOKEN=anon: no credential lookup); ArrayRecord's reader
(google-cloud-cpp) by CLOUD_STORAGE_EMULATOR_ENDPOINT; tensorstore by
TENSORSTORE_GCS_HTTP_URL with a fixed GOOGLE_AUTH_TOKEN_FOR_TESTING.

Use from a test module (before anything imports gcsfs):

  import gcs_emulator
  gcs = gcs_emulator.fixture()        # module-scoped pytest fixture yielding the env vars
"""

import contextlib
import os
import re
import socket

import pytest

# Read once, when gcsfs is imported: its zonal-bucket probe would wait on gRPC timeouts here.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

BUCKET = "bvl-test"


def serve_suffix_ranges() -> None:
  """Teaches the emulator `Range: bytes=-N` (the last N bytes), which GCS serves and ArrayRecord's reader asks."""
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.download, "_bvl_suffix_ranges", False):
    return
  download = objects.download
  def patched(request, response, storage_, *args, **kwargs):
    m = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", None) or "")
    if m:
      size = len(storage_.get_file(request.params["bucket_name"], request.params["object_id"]))
      fixed, get = f"bytes={max(0, size - int(m.group(1)))}-", request.get_header
      request.get_header = lambda name, default=None: fixed if name.lower() == "range" else get(name, default)
    return download(request, response, storage_, *args, **kwargs)
  patched._bvl_suffix_ranges = True
  objects.download = patched  # objects.get (alt=media) looks it up at call time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = BUCKET):
  """Starts an in-memory emulator with `bucket`; yields {env vars}, also set in this process meanwhile."""
  emulator_server = pytest.importorskip("gcp_storage_emulator.server", reason="the [test] extra installs it")
  pytest.importorskip("gcsfs", reason="the [test] extra installs gcsfs")
  serve_suffix_ranges()
  port = free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
         "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS_TOKEN": "anon"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # FSSPEC_GS_TOKEN, read at fsspec's import
  fsspec.get_filesystem_class("gs").clear_instance_cache()  # a cached instance could point elsewhere
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf["gs"].pop("token", None)
    fsspec.get_filesystem_class("gs").clear_instance_cache()
    server.stop()


def fixture(bucket: str = BUCKET):
  """A module-scoped pytest fixture running the emulator (assign it to a name in the test module)."""
  @pytest.fixture(scope="module")
  def gcs():
    with running(bucket) as env:
      yield env
  return gcs
