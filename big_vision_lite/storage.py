"""One path layer for every file the trainer reads or writes: local disk, gs:// and any etils.epath scheme.

Local paths go through os/glob exactly as before (`~` expanded); a path with a
scheme (`gs://bucket/dir`) goes through `etils.epath`, which tfds and Orbax use
too (gs:// needs `gcsfs`: the `[gcs]` extra). See docs/storage.md.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import re
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath

_WILDCARD = re.compile(r"[*?\[]")


class StorageError(OSError):
  """A remote path that cannot be reached (missing backend package, no credentials, no network)."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (`gs://...`) rather than the local disk."""
  return "://" in os.fspath(path)


def join(path: str, *parts: str) -> str:
  """`os.path.join` that keeps `gs://` intact (posix joining, as epath does)."""
  return "/".join([path.rstrip("/"), *parts]) if is_remote(path) else os.path.join(path, *parts)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath.Path for `path` (`~` expanded when local)."""
  return epath.Path(path) if is_remote(path) else epath.Path(os.path.expanduser(os.fspath(path)))


def _remote(fn, path, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
    raise
  except ImportError as e:
    raise StorageError(f"{path}: this scheme needs an extra package ({e}); "
                       f"for gs:// run `pip install gcsfs` (the [gcs] extra)") from None
  except Exception as e:  # noqa: BLE001 - auth, network and backend errors as one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise StorageError(f"{path}: cannot reach storage ({type(e).__name__}: {first[:200]})") from None


def exists(path: str | os.PathLike) -> bool:
  """Whether a file or directory exists at `path`."""
  if not is_remote(path):
    return os.path.exists(os.path.expanduser(path))
  return _remote(as_path(path).exists, path)


def isdir(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory (for object stores: a prefix with objects below it)."""
  if not is_remote(path):
    return os.path.isdir(os.path.expanduser(path))
  return _remote(as_path(path).is_dir, path)


def listdir(path: str | os.PathLike) -> list[str]:
  """Names of the entries directly in `path`."""
  if not is_remote(path):
    return os.listdir(os.path.expanduser(path))
  return _remote(lambda: [p.name for p in as_path(path).iterdir()], path)


def makedirs(path: str | os.PathLike, exist_ok: bool = True) -> None:
  """Creates `path` and its parents (object stores have no folders: nothing to do there)."""
  if not is_remote(path):
    os.makedirs(os.path.expanduser(path), exist_ok=exist_ok)
  else:
    _remote(as_path(path).mkdir, path, parents=True, exist_ok=exist_ok)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
  """Opens `path` for reading or (over)writing; remote files are written when closed."""
  if not is_remote(path):
    return open(os.path.expanduser(path), mode, **({} if "b" in mode else {"encoding": "utf-8"}))
  return _remote(as_path(path).open, path, mode)


def read_text(path: str | os.PathLike) -> str:
  """The whole text file at `path`."""
  with open_file(path) as f:
    return f.read()


def _remote_files(path: str) -> list[str]:
  """'/'-joined paths, relative to the folder `path`, of every object below it (`path/...` only).

  fsspec-backed walks name their folders without the scheme ('bucket/dir'): the relative
  paths are cut from those names at exactly `bucket/dir/`, so a sibling `bucket/dir2/...`
  is never taken for part of `bucket/dir`.
  """
  base = os.fspath(path).rstrip("/").split("://", 1)[1] + "/"
  rels = _remote(lambda: [f"{os.fspath(r).split('://', 1)[-1].rstrip('/')}/{n}"
                          for r, _, names in as_path(path).walk() for n in names], path)
  return sorted(r[len(base):] for r in rels if r.startswith(base))


def rename(src: str, dst: str) -> None:
  """Moves a file or a directory tree (on object stores: copy, then delete each object copied)."""
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  s, d = as_path(src), as_path(dst)
  if is_remote(src) and _remote(s.is_dir, src):
    rels = _remote_files(src)
    for rel in rels:
      copy(join(src, rel), join(dst, rel))
    for rel in rels:  # not rmtree: on a prefix store that may take `src*`, not only `src/`
      _remote(as_path(join(src, rel)).unlink, src)
  elif is_remote(src) != is_remote(dst) or s.is_dir():
    if s.is_dir():  # a local folder to an object store
      upload_tree(src, dst)
      shutil.rmtree(src)
    else:
      copy(src, dst)
      _remote(s.unlink, src) if is_remote(src) else os.remove(src)
  else:
    _remote(s.rename, src, d)


def copy(src: str, dst: str) -> None:
  """Copies one file, between any two of local disk and object stores."""
  with open_file(src, "rb") as fin, open_file(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 22)


def glob(pattern: str) -> list[str]:
  """Sorted paths matching `pattern` (`*`, `?`, `[...]`; remote: wildcards after the bucket)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  first = next((i for i, p in enumerate(parts) if _WILDCARD.search(p)), None)
  if first is None:
    return [pattern] if exists(pattern) else []
  if first == 0:
    raise ValueError(f"{pattern}: wildcards in the bucket name are not supported")
  base = f"{scheme}://{'/'.join(parts[:first])}"
  return sorted(os.fspath(p) for p in _remote(lambda: list(as_path(base).glob("/".join(parts[first:]))),
                                               pattern))


def upload_tree(local_dir: str, dst: str) -> None:
  """Copies every file below `local_dir` to the same relative path below `dst`."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      copy(os.path.join(root, name), join(dst, *rel.split(os.sep)))


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
  """A local folder standing for `path`: `path` itself, or a temporary one uploaded there on success.

  For writers that only take a local folder (torch `save_pretrained`, safetensors).
  """
  if not is_remote(path):
    os.makedirs(os.path.expanduser(path), exist_ok=True)
    yield os.path.expanduser(path)
    return
  with tempfile.TemporaryDirectory(prefix="bvl_stage_") as tmp:
    yield tmp
    upload_tree(tmp, path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding what `path` holds: `path` itself (`~` expanded), or a temporary download.

  For readers that only take a local path (safetensors, timm/open_clip folders, tensorstore's file
  driver). A remote folder is downloaded whole; the copy is deleted on exit.
  """
  if not is_remote(path):
    yield os.path.expanduser(os.fspath(path))
    return
  with tempfile.TemporaryDirectory(prefix="bvl_fetch_") as tmp:
    dst = os.path.join(tmp, os.fspath(path).rstrip("/").rsplit("/", 1)[-1] or "data")
    if isdir(path):
      for rel in _remote_files(path):
        local = os.path.join(dst, *rel.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        copy(join(os.fspath(path), rel), local)
    else:
      copy(path, dst)
    yield dst
