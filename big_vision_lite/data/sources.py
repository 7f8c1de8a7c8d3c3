"""Random-access data sources from a data config: built-in, tfds datasets, ArrayRecord files.

Every source yields examples as dicts whose `image` entry holds *encoded* image
bytes (PNG/JPEG), so the `decode` op decodes them uniformly whatever the source.

Plain ArrayRecord format (`name="array_record"`): one record per example, the
record being a `flax.serialization.msgpack_serialize`d dict with string keys
and values that are numpy arrays, bytes, str, int or float; `image` holds the
encoded image bytes. `write_array_record` writes such files; bvl-make-dataset
(big_vision_lite.tools.make_dataset) writes shuffled ones with a dataset_info.json.
"""

from __future__ import annotations

import logging
import os
import tempfile
import types
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np
from flax import serialization

from big_vision_lite import storage
from big_vision_lite.config import ConfigError
from big_vision_lite.data import dataset_info

BUILTIN = "bvl_shapes"
_log = logging.getLogger("big_vision_lite")
_warned: set[tuple] = set()  # (files, split) already warned about, so each is said once


class ArrayRecordSource:
  """ArrayRecord files of msgpack-serialized example dicts (format in the module doc)."""

  def __init__(self, paths: Sequence[str], start: int = 0, stop: int | None = None):
    import grain  # Lazy: grain's import is slow and most callers only build configs.
    self.paths = list(paths)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    n = len(self._source)
    self.start, self.stop = start, n if stop is None else stop
    if not 0 <= self.start <= self.stop <= n:
      raise ValueError(f"bad slice [{start}:{stop}] of {n} records in {self.paths[0]}...")

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range (0..{len(self) - 1})")
    raw = self._source[self.start + index]
    try:
      return serialization.msgpack_restore(raw)
    except Exception as e:
      raise ValueError(f"record {index} of {self.paths} is not a msgpack-serialized dict: {e}") from e

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self)} records from {len(self.paths)} files, e.g. {self.paths[0]})"


def write_array_record(path: str, examples: Iterable[dict[str, Any]]) -> int:
  """Writes `examples` (dicts, see the module doc) as one ArrayRecord file; returns the count.

  A remote `path` (gs://) is written locally first, then uploaded.
  """
  if storage.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="bvl_ar_") as tmp:
      n = write_array_record(os.path.join(tmp, "part.array_record"), examples)
      storage.copy(os.path.join(tmp, "part.array_record"), path)
    return n
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # group_size:1 makes each record separately addressable: fast random access.
  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  n = 0
  try:
    for i, ex in enumerate(examples):
      if not isinstance(ex, dict) or not all(isinstance(k, str) for k in ex):
        raise TypeError(f"example {i} written to {path} must be a dict with str keys, got {type(ex).__name__}")
      writer.write(serialization.msgpack_serialize(ex))
      n += 1
  finally:
    writer.close()
  return n


def _expand_files(files: str | Sequence[str], key: str) -> list[str]:
  patterns = [files] if isinstance(files, str) else list(files)
  if not patterns:
    raise ConfigError(f"{key}.files is empty: give a glob pattern or a list of ArrayRecord files")
  paths = []
  for pattern in patterns:
    matched = storage.glob(pattern)
    if not matched:
      raise FileNotFoundError(f"{key}.files: no file matches {pattern!r}")
    paths.extend(matched)
  return paths


def _slice_bounds(split: str | None, n: int, key: str) -> tuple[int, int]:
  """Resolves tfds-style slicing ("train[:90%]", "x[100:]") against n records."""
  if not split or "[" not in split:
    return 0, n
  import tensorflow_datasets as tfds
  name = split.split("[")[0] or "all"
  try:
    ri = tfds.core.ReadInstruction.from_spec(split if split[0] != "[" else name + split)
    (abs_ri,) = ri.to_absolute({name: types.SimpleNamespace(num_examples=n)})
  except Exception as e:
    raise ConfigError(f"{key}.split: cannot parse {split!r}: {e}") from e
  start = abs_ri.from_ or 0
  stop = n if abs_ri.to is None else abs_ri.to
  return start, stop


def _tfds_source(name: str, split: str, data_dir: str | None, key: str):
  import tensorflow_datasets as tfds
  hint = f"(prepare it with `tfds build {name} --data_dir={data_dir or '<dir>'} --file_format=array_record`)"
  if not data_dir:
    raise ConfigError(f"{key}.data_dir: not set, so tfds dataset {name!r} cannot be found; "
                     f"nothing is downloaded at run time {hint}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # Unknown name and not on disk either.
    prepared = False
  if not prepared:
    raise ConfigError(f"{key}.data_dir: dataset {name!r} not found in {data_dir!r} {hint}")
  file_format = str(builder.info.file_format.value if builder.info.file_format else "tfrecord")
  if file_format not in ("array_record", "parquet"):
    raise ConfigError(f"{key}.name: dataset {name!r} in {data_dir!r} is stored as {file_format}, which has "
                     f"no random access; rebuild it with --file_format=array_record")
  splits = list(builder.info.splits)
  try:
    # Images stay encoded: the `decode` op decodes, as for the other sources.
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=_skip_image_decoding(builder.info.features))
  except Exception as e:
    raise ConfigError(f"{key}.split: cannot read split {split!r} of {name!r} "
                     f"(splits: {', '.join(splits)}): {e}") from e


def _skip_image_decoding(features) -> dict | None:
  import tensorflow_datasets as tfds
  if not isinstance(features, tfds.features.FeaturesDict):
    return None
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, tfds.features.Image)}
  return skip or None


# The keys each kind of source reads; any other key in a data config is a mistake.
_COMMON_KEYS = ("name", "split")
_KEYS = {"array_record": ("files",), "tar": ("files",), BUILTIN: ("data_dir",)}
_TFDS_KEYS = ("data_dir",)


def data_keys(name: str) -> tuple[str, ...]:
  """The config keys a data source of kind `name` reads (a tfds name reads data_dir)."""
  return _COMMON_KEYS + _KEYS.get(name.split("/")[0], _TFDS_KEYS)


def get_source(data_config: ml_collections.ConfigDict, *, config_key: str = "config.input.data"):
  """A random-access source (`len`, `[i]` -> example dict) for `data_config`.

  `data_config.name`: "bvl_shapes[/tiny]" (built on demand into `data_dir` or
  the cache), "array_record" (`files`: glob or list), or a tfds dataset name
  read from `data_dir` (never downloaded). `split` takes tfds slicing.
  `config_key` is where this data config lives (e.g. config.input.data), to name keys in errors.
  """
  name = data_config.get("name")
  if not name:
    raise ConfigError(f"{config_key}.name is not set (e.g. 'bvl_shapes', 'array_record' or a tfds name)")
  split = data_config.get("split", None)
  data_dir = data_config.get("data_dir", None)
  if name == "tar":  # web-style image+caption shards (img2dataset); see sources_tar
    from big_vision_lite.data.sources_tar import TarSource
    files = data_config.get("files", None)
    if files is None:
      raise ConfigError(f"{config_key}.files must be set when {config_key}.name is 'tar'")
    paths = _expand_files(files, config_key)
    whole = TarSource(paths)
    start, stop = _slice_bounds(split, len(whole), config_key)
    _warn_if_unshuffled(whole, paths, split, start, stop, config_key)
    return TarSource(paths, start, stop)
  if name == "array_record":
    files = data_config.get("files", None)
    if files is None:
      raise ConfigError(f"{config_key}.files must be set when {config_key}.name is 'array_record'")
    paths = _expand_files(files, config_key)
    whole = ArrayRecordSource(paths)
    start, stop = _slice_bounds(split, len(whole), config_key)
    _warn_if_unshuffled(whole, paths, split, start, stop, config_key)
    return ArrayRecordSource(paths, start, stop)
  if not split:
    raise ConfigError(f"{config_key}.split is not set (e.g. 'train' or 'train[:90%]')")
  if name.split("/")[0] == BUILTIN:
    from big_vision_lite.data import shapes
    config = name.split("/")[1] if "/" in name else "default"
    data_dir = shapes.ensure_built(data_dir, config=config)
    name = f"{BUILTIN}/{config}"
  return _tfds_source(name, split, data_dir, config_key)


def _labels_look_sorted(source, samples: int = 32) -> bool:
  """True if the `label`s of evenly spaced records never decrease and take several values."""
  n = len(source)
  labels = []
  for i in sorted({i * (n - 1) // max(1, samples - 1) for i in range(samples)} if n else set()):
    label = source[i].get("label")
    if label is None or np.ndim(label) != 0:
      return False
    labels.append(int(label))
  return len(set(labels)) > 1 and all(a <= b for a, b in zip(labels, labels[1:]))


def _warn_if_unshuffled(whole, paths: list[str], split: str | None, start: int, stop: int,
                        config_key: str) -> None:
  """One warning line when a contiguous slice is taken of records not known to be shuffled."""
  n = len(whole)
  if (start, stop) == (0, n) or (tuple(paths), split) in _warned:
    return
  found = dataset_info.for_files(paths)
  if found is None or found[0].get("shuffled") is not True:
    why = f"not known to be shuffled (no {dataset_info.INFO_FILE} saying so)"
  elif _labels_look_sorted(whole):
    why = "sorted by label"
  else:
    return
  _warned.add((tuple(paths), split))
  _log.warning("%s.split %r takes records %d:%d of %d in file order, which are %s: the held-out part "
               "may hold only the last classes (shuffle the data with bvl-make-dataset)",
               config_key, split, start, stop, n, why)


def info_for(data_config: ml_collections.ConfigDict) -> tuple[dict, str] | None:
  """(summary, split) of an array_record data config whose files are one split of a dataset_info.json."""
  if data_config.get("name") != "array_record" or data_config.get("files") is None:
    return None
  try:
    paths = _expand_files(data_config.get("files"), "config.input.data")
  except (ConfigError, FileNotFoundError):
    return None
  return dataset_info.for_files(paths)


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The class names the data's dataset_info.json lists, if any."""
  found = info_for(data_config)
  names = found[0].get("class_names") if found else None
  return tuple(names) if names else None


def num_examples(data_config: ml_collections.ConfigDict, *, config_key: str = "config.input.data") -> int:
  """Examples in the (sliced) split; from dataset_info.json without reading records when there is one."""
  found = info_for(data_config)
  if found is not None:
    n = int(found[0]["splits"][found[1]]["num_examples"])
    start, stop = _slice_bounds(data_config.get("split", None), n, config_key)
    return stop - start
  return len(get_source(data_config, config_key=config_key))
