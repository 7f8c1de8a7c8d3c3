"""Reads big_vision's tensorstore checkpoints (utils.save_checkpoint_ts) into flat numpy params.

Layout: a folder `<prefix>-<step:09d>` holding one zarr array per leaf, named by its
tree path with "/" written as "~" (e.g. `params~img~embedding~kernel`), beside a
`<prefix>-LAST` file naming the latest complete step folder. Needs the `tensorstore`
package (installed with orbax-checkpoint).
"""

from __future__ import annotations

import os

import numpy as np

from big_vision_lite import storage
from big_vision_lite.convert.tables import ConversionError


def resolve(path: str) -> str:
  """The step folder: `path` itself if it holds arrays, else the folder its `-LAST` file names."""
  path = path.rstrip("/")
  if storage.isdir(path) and any("~" in n or _is_array(storage.join(path, n)) for n in storage.listdir(path)):
    return path
  last = f"{path}-LAST"
  if storage.exists(last) and not storage.isdir(last):
    step_dir = f"{path}-{storage.read_text(last).strip()}"
    if not storage.isdir(step_dir):
      raise ConversionError(f"{last} names {step_dir}, which does not exist")
    return step_dir
  raise ConversionError(f"{path}: not a big_vision tensorstore checkpoint (no array folders like "
                        f"params~..., and no {os.path.basename(last)} file)")


def _is_array(d: str) -> bool:
  return storage.exists(storage.join(d, ".zarray")) or storage.exists(storage.join(d, "zarr.json"))


def is_checkpoint(path: str) -> bool:
  try:
    resolve(path)
    return True
  except ConversionError:
    return False


def read(path: str) -> dict[str, np.ndarray]:
  """Flat {'img/embedding/kernel': array} of the checkpoint's `params` (other trees, e.g. opt, ignored)."""
  try:
    import tensorstore as ts
  except ImportError as e:
    raise ConversionError("reading tensorstore checkpoints needs the tensorstore package "
                          "(pip install tensorstore)") from e
  step_dir = resolve(path)
  if storage.is_remote(step_dir):
    # Read through a local download (tensorstore's file driver), the same code as local checkpoints.
    try:
      with storage.local_copy(step_dir) as local:
        return _read_step_dir(ts, local)
    except storage.StorageError as e:
      raise ConversionError(str(e)) from None
  return _read_step_dir(ts, step_dir)


def _read_step_dir(ts, step_dir: str) -> dict[str, np.ndarray]:
  flat = {}
  for name in sorted(os.listdir(step_dir)):
    d = os.path.join(step_dir, name)
    if not os.path.isdir(d):
      continue
    key = name.replace("~", "/")
    if not key.startswith("params/"):
      continue
    if not _is_array(d):
      raise ConversionError(f"{d}: no .zarray or zarr.json: not a tensorstore zarr array")
    driver = "zarr" if os.path.isfile(os.path.join(d, ".zarray")) else "zarr3"
    try:
      arr = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": d}}, open=True).result()
      flat[key[len("params/"):]] = np.asarray(arr.read().result())
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants.
      msg = (str(e).strip().splitlines() or [""])[0][:200]
      raise ConversionError(f"cannot read {d}: {type(e).__name__}: {msg}") from e
  if not flat:
    raise ConversionError(f"{step_dir}: no params~... arrays")
  return flat
