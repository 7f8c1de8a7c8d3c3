"""Web-style tar shards (img2dataset layout) read through get_source and the grain pipeline."""

import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest

from big_vision_lite.data import pipeline, shapes, sources
from big_vision_lite.data.sources_tar import TarSource


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_shards(tmp_path, n_shards=2, per_shard=5):
  truth = {}
  for s in range(n_shards):
    with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
      for j in range(per_shard):
        key = f"{s:05d}{j:04d}"
        ex = shapes.generate_example("train", s * per_shard + j, image_size=16)
        png = shapes.encode_png(ex["image"])
        _add(tar, f"{key}.jpg", png)  # img2dataset names it .jpg; decode sniffs the format
        _add(tar, f"{key}.txt", ex["caption"].encode())
        _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        truth[key] = (png, ex["caption"])
      _add(tar, "orphan.txt", b"no image")  # skipped
  return truth


def test_tar_source_random_access(tmp_path):
  truth = _write_shards(tmp_path)
  src = sources.get_source(ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "*.tar"),
                                                          split="train")))
  assert isinstance(src, TarSource) and len(src) == 10 and src.skipped == 2
  for i in [7, 0, 9, 3]:
    ex = src[i]
    png, caption = truth[ex["key"]]
    assert ex["image"] == png and ex["caption"] == caption and json.loads(ex["json"])["key"] == ex["key"]
  assert "10 examples from 2 tars" in repr(src)
  with pytest.raises(IndexError):
    src[10]
  sliced = sources.get_source(ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "*.tar"),
                                                             split="train[2:5]")))
  assert len(sliced) == 3 and sliced[0]["key"] == src[2]["key"]


def test_tar_through_grain_pipeline(tmp_path):
  _write_shards(tmp_path)
  cfg = ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "*.tar"), split="train"))
  # The 2 orphan groups of 12 count as bad examples (pipeline.check_skipped_groups).
  it = pipeline.make_train_iterator(cfg, "decode|tokenize(16)|keep('image', 'labels')", global_batch_size=4,
                                    seed=0, process_index=0, process_count=1, bad_examples="skip",
                                    max_bad_fraction=0.5)
  batch = next(it)
  assert batch["image"].shape == (4, 16, 16, 3) and batch["labels"].shape == (4, 16)
  assert np.all(batch["labels"][:, 0] > 0)


def test_tar_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file matches"):
    sources.get_source(ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "*.tar"))))
  with pytest.raises(ValueError, match="files must be set"):
    sources.get_source(ml_collections.ConfigDict(dict(name="tar")))
  bad = tmp_path / "bad.tar"
  bad.write_bytes(b"not a tar" * 100)
  with pytest.raises(ValueError, match="bad.tar"):
    TarSource([str(bad)])
