"""Random-access data sources from a data config: the source registry, ArrayRecord files, tfds.

`config.input.data.name` picks a source registered in SOURCES (`array_record` and `bvl_shapes`
here, `tar` in sources_tar.py; a new source is a new `data/sources_*.py` calling `register`);
any other name is a tfds dataset read from `data_dir`.

Every source yields examples as dicts whose `image` entry holds *encoded* image
bytes (PNG/JPEG), so the `decode` op decodes them uniformly whatever the source.

Plain ArrayRecord format (`name="array_record"`): one record per example, the
record being a `flax.serialization.msgpack_serialize`d dict with string keys
and values that are numpy arrays, bytes, str, int or float; `image` holds the
encoded image bytes. `write_array_record` writes such files; bvl-make-dataset
(big_vision_lite.tools.make_dataset) writes shuffled ones with a dataset_info.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import tempfile
import types
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np
from flax import serialization

from big_vision_lite import storage
from big_vision_lite.config import ConfigError
from big_vision_lite.data import dataset_info
from big_vision_lite.registry import Registry

BUILTIN = "bvl_shapes"
_log = logging.getLogger("big_vision_lite")
_warned: set[tuple] = set()  # (files, split) already warned about, so each is said once


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of data source: the data-config keys it reads besides name and split, those of
  them it needs, and `open(data_config, config_key)` -> a source (`len`, `[i]` -> example dict)."""
  keys: tuple[str, ...]
  required: tuple[str, ...]
  open: Callable[[ml_collections.ConfigDict, str], Any]


# Found by name on first lookup in data/sources_*.py (registry.py); sources.py registers its own.
SOURCES = Registry("data source", "big_vision_lite.data", modules=("sources_*",))


def register(name: str, keys: Sequence[str] = (), required: Sequence[str] = ()):
  """Registers `open(data_config, config_key) -> source` as the data source `name`."""
  def decorator(fn):
    SOURCES.register(name)(SourceKind(tuple(keys), tuple(required), fn))
    return fn
  return decorator


def source_kind(name: str) -> SourceKind | None:
  """The registered kind of data name `name` ("bvl_shapes/tiny" -> bvl_shapes), None for tfds."""
  kind = (name or "").split("/")[0]
  return SOURCES.get(kind) if kind in SOURCES else None


def tfds_hint(name: str) -> str:
  """"; did you mean data source 'x'?" for a tfds name that is a near miss of a registered one."""
  close = difflib.get_close_matches(name, SOURCES.names(), n=1)
  return f"; did you mean data source {close[0]!r}?" if close else ""


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
                     f"nothing is downloaded at run time {hint}{tfds_hint(name)}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # Unknown name and not on disk either.
    prepared = False
  if not prepared:
    raise ConfigError(f"{key}.data_dir: dataset {name!r} not found in {data_dir!r} {hint}{tfds_hint(name)}")
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


_COMMON_KEYS = ("name", "split")  # every source reads these
_TFDS_KEYS = ("data_dir",)


def data_keys(name: str) -> tuple[str, ...]:
  """The config keys a data source of kind `name` reads (a tfds name reads data_dir); any
  other key in a data config is a mistake."""
  kind = source_kind(name)
  return _COMMON_KEYS + (kind.keys if kind else _TFDS_KEYS)


def get_source(data_config: ml_collections.ConfigDict, *, config_key: str = "config.input.data"):
  """A random-access source (`len`, `[i]` -> example dict) for `data_config`.

  `data_config.name`: a registered source ("bvl_shapes[/tiny]" built on demand into `data_dir`
  or the cache, "array_record" or "tar" with `files`: glob or list) or a tfds dataset name read
  from `data_dir` (never downloaded). `split` takes tfds slicing.
  `config_key` is where this data config lives (e.g. config.input.data), to name keys in errors.
  """
  name = data_config.get("name")
  if not name:
    raise ConfigError(f"{config_key}.name is not set (e.g. {', '.join(map(repr, SOURCES.names()))} "
                      "or a tfds name)")
  kind = source_kind(name)
  if kind is not None:
    return kind.open(data_config, config_key)
  return _tfds_source(name, _split_of(data_config, config_key), data_config.get("data_dir", None),
                      config_key)


def _split_of(data_config: ml_collections.ConfigDict, config_key: str) -> str:
  split = data_config.get("split", None)
  if not split:
    raise ConfigError(f"{config_key}.split is not set (e.g. 'train' or 'train[:90%]')")
  return split


def open_files(source_cls: Callable[..., Any], data_config: ml_collections.ConfigDict,
               config_key: str):
  """`source_cls(paths, start, stop)` over `data_config.files`, sliced by its split: the opener
  of a source made of files (array_record, tar); warns once of a slice of unshuffled records."""
  files = data_config.get("files", None)
  if files is None:
    raise ConfigError(f"{config_key}.files must be set when {config_key}.name is {data_config.name!r}")
  split = data_config.get("split", None)
  paths = _expand_files(files, config_key)
  whole = source_cls(paths)
  start, stop = _slice_bounds(split, len(whole), config_key)
  _warn_if_unshuffled(whole, paths, split, start, stop, config_key)
  return source_cls(paths, start, stop)


@register("array_record", keys=("files",), required=("files",))
def _open_array_record(data_config: ml_collections.ConfigDict, config_key: str) -> ArrayRecordSource:
  return open_files(ArrayRecordSource, data_config, config_key)


@register(BUILTIN, keys=("data_dir",))
def _open_shapes(data_config: ml_collections.ConfigDict, config_key: str):
  """The built-in shapes dataset ("bvl_shapes" or "bvl_shapes/<config>"), built on first use."""
  from big_vision_lite.data import shapes
  split = _split_of(data_config, config_key)
  name = data_config.name
  config = name.split("/")[1] if "/" in name else "default"
  data_dir = shapes.ensure_built(data_config.get("data_dir", None), config=config)
  return _tfds_source(f"{BUILTIN}/{config}", split, data_dir, config_key)


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
