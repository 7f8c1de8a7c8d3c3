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


def serve_generations() -> None:
  """Teaches the emulator GCS's object generations, which tensorstore's gcs kvstore (Orbax's OCDBT) relies on.

  The emulator ignores preconditions and sends no `x-goog-generation` with a download. tensorstore
  reads the manifest with `ifGenerationNotMatch=<the one it has>` and takes the object's generation
  from that header: with a 200 and no header it keeps a generation-less stamp, and its next
  `ifGenerationMatch` write fails "Malformed StorageGeneration". Like GCS, this serves
  x-goog-generation / x-goog-metageneration on object GETs and answers `ifGenerationMatch`
  (0: must not exist), `ifGenerationNotMatch` and `ifMetagenerationMatch` with 412, or 304 for a
  read whose generation did not change. The server is single-threaded, so check and write are atomic.
  """
  from http import HTTPStatus
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  if getattr(server, "_bvl_generations", False):
    return
  def wrap(handler):
    def patched(request, response, storage_, *args, **kwargs):
      params, query = request.params or {}, request.query
      bucket = params.get("bucket_name")
      name = params.get("object_id") or (query.get("name") or [None])[0]
      arg = lambda key: int(query[key][0]) if key in query else None
      obj = None
      if bucket and name:
        try:
          obj = storage_.get_file_obj(bucket, name)
        except NotFound:
          pass
      read = request.method == "GET"
      if bucket and name and not (read and obj is None):  # a read of a missing object: 404 as usual
        gen = int(obj["generation"]) if obj else 0
        match, not_match, meta = arg("ifGenerationMatch"), arg("ifGenerationNotMatch"), arg("ifMetagenerationMatch")
        if not_match is not None and obj is not None and not_match == gen:
          response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
          return
        if (match is not None and match != gen) or (
            meta is not None and (obj is None or meta != int(obj["metageneration"]))):
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({"error": {"code": 412, "message": "Precondition Failed"}})
          return
      handler(request, response, storage_, *args, **kwargs)
      if read and obj is not None and response.status.value in (200, 206):
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return patched
  wrapped = {f: wrap(f) for f in (objects.get, objects.delete, objects.patch, objects.insert)}
  server.HANDLERS = tuple((regex, {m: wrapped.get(f, f) for m, f in routes.items()})
                          for regex, routes in server.HANDLERS)  # Router.handle reads it per request
  server._bvl_generations = True


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
  serve_generations()
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
