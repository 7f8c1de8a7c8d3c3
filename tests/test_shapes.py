"""Tests for the built-in bvl_shapes dataset: drawing, captions, tfds build and cache."""

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from big_vision_lite.data import shapes


def test_generation_is_deterministic_per_split_and_index():
  a = shapes.generate_example("train", 7)
  b = shapes.generate_example("train", 7)
  assert shapes.encode_png(a["image"]) == shapes.encode_png(b["image"])
  assert a["caption"] == b["caption"] and a["label"] == b["label"]
  c = shapes.generate_example("validation", 7)
  d = shapes.generate_example("train", 7, seed=1)
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["image"], d["image"])


def test_examples_are_consistent_with_their_labels():
  n = 300
  exs = [shapes.generate_example("train", i) for i in range(n)]
  labels = np.array([e["label"] for e in exs])
  assert labels.min() >= 0 and labels.max() < len(shapes.CLASS_NAMES)
  assert set(labels) == set(range(len(shapes.CLASS_NAMES)))
  assert {e["size"] for e in exs} == {0, 1, 2}
  for e in exs:
    image = e["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    shape, color = shapes.CLASS_NAMES[e["label"]], shapes.COLOR_NAMES[e["color"]]
    size, bg = shapes.SIZE_NAMES[e["size"]], shapes.BACKGROUND_NAMES[e["background"]]
    pos = shapes.POSITION_NAMES[e["position"]]
    assert e["caption"] == f"a {size} {color} {shape} on a {bg} background {pos}"
    assert color != bg
    # The shape's colour is really drawn: many pixels close to it (noise is +-4)...
    col = np.array(shapes.COLORS[color])
    near = (np.abs(image.astype(int) - col).max(-1) <= 6).sum()
    assert near >= 20, e["caption"]
    # ...and the background covers the rest of the image.
    bgc = np.array(shapes.BACKGROUNDS[bg])
    assert (np.abs(image.astype(int) - bgc).max(-1) <= 6).mean() > 0.4, e["caption"]


def test_size_and_position_match_the_drawing():
  for i in range(60):
    e = shapes.generate_example("train", i)
    col = np.array(shapes.COLORS[shapes.COLOR_NAMES[e["color"]]])
    ys, xs = np.nonzero(np.abs(e["image"].astype(int) - col).max(-1) <= 6)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    row, column = min(int(3 * cy / 64), 2), min(int(3 * cx / 64), 2)
    # The bounding-box centre can sit a pixel or two from the drawn centre.
    pos = shapes.POSITION_NAMES[e["position"]]
    near = {shapes.POSITION_NAMES[3 * r + c] for r in range(3) for c in range(3)
            if abs(r - row) <= 1 and abs(c - column) <= 1}
    assert pos in near
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    lo, hi = shapes.SIZES[shapes.SIZE_NAMES[e["size"]]]
    # Rotated crosses and stars reach a little past the nominal radius.
    assert 2 * lo * 64 * 0.6 <= extent <= 2 * hi * 64 * 1.1 + 2, (e["caption"], extent)


def test_caption_for():
  assert shapes.caption_for("triangle", "red", "small", "grey", "in the top left") == (
      "a small red triangle on a grey background in the top left")


def test_unknown_split_is_a_clear_error():
  with pytest.raises(ValueError, match="no split 'val'"):
    shapes.generate_example("val", 0)


def test_ensure_built_reads_back_and_second_call_is_a_no_op(tmp_path):
  data_dir = shapes.ensure_built(str(tmp_path), config="tiny")
  assert data_dir == str(tmp_path)
  t0 = time.time()
  assert shapes.ensure_built(str(tmp_path), config="tiny") == data_dir
  assert time.time() - t0 < 1.0
  ds = tfds.data_source("bvl_shapes/tiny", split="train", data_dir=data_dir)
  assert len(ds) == shapes.NUM_TRAIN_TINY
  ex = ds[5]
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
  assert isinstance(ex["caption"], bytes)
  assert shapes.CLASS_NAMES[ex["label"]].encode() in ex["caption"]
  val = tfds.data_source("bvl_shapes/tiny", split="validation", data_dir=data_dir)
  assert len(val) == shapes.NUM_VALIDATION_TINY
  # Stored images are exactly the generated ones (PNG is lossless): find one by caption.
  captions = {shapes.generate_example("validation", i)["caption"]: i for i in range(len(val))}
  raw = tfds.data_source("bvl_shapes/tiny", split="validation", data_dir=data_dir,
                         decoders={"image": tfds.decode.SkipDecoding()})[0]
  i = captions[raw["caption"].decode()]
  decoded = np.asarray(Image.open(io.BytesIO(raw["image"])))
  np.testing.assert_array_equal(decoded, shapes.generate_example("validation", i)["image"])


def test_half_built_dataset_is_rebuilt(tmp_path):
  version = str(shapes.BvlShapes.VERSION)
  version_dir = tmp_path / "bvl_shapes" / "tiny" / version
  version_dir.mkdir(parents=True)
  (version_dir / "bvl_shapes-train.array_record-00000-of-00001").write_bytes(b"truncated")
  (tmp_path / "bvl_shapes" / "tiny" / f"incomplete.ABC_{version}").mkdir()
  shapes.ensure_built(str(tmp_path), config="tiny")
  assert not (tmp_path / "bvl_shapes" / "tiny" / f"incomplete.ABC_{version}").exists()
  ds = tfds.data_source("bvl_shapes/tiny", split="train", data_dir=str(tmp_path))
  assert len(ds) == shapes.NUM_TRAIN_TINY and ds[len(ds) - 1]["image"].shape == (64, 64, 3)


def test_concurrent_builders_build_once(tmp_path):
  code = ("import sys; from big_vision_lite.data import shapes; "
          "shapes.ensure_built(sys.argv[1], config='tiny'); print('ok')")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.strip().endswith("ok")
  # Exactly one of them generated the data; the other found it built.
  assert sum("Generating" in err or "Downloading and preparing" in out for out, err in outs) == 1
  ds = tfds.data_source("bvl_shapes/tiny", split="validation", data_dir=str(tmp_path))
  assert len(ds) == shapes.NUM_VALIDATION_TINY


def test_default_config_is_full_size():
  builder = shapes.BvlShapes(data_dir="/nonexistent")
  assert builder.builder_config.name == "default"
  assert builder.builder_config.num_train == shapes.NUM_TRAIN == 20_000
  assert builder.builder_config.num_validation == shapes.NUM_VALIDATION == 2_000
  assert shapes.default_data_dir()


def test_box_is_the_tight_box_of_the_shapes_pixels():
  # Outside the box the image is background plus noise; each edge row/column of the box holds
  # a pixel of the shape's colour.
  for i in range(30):
    ex = shapes.generate_example("train", i)
    s = ex["image"].shape[0]
    y0, x0, y1, x1 = np.round(ex["box"] * s).astype(int)
    assert 0 <= y0 < y1 <= s and 0 <= x0 < x1 <= s
    color = np.array(shapes.COLORS[shapes.COLOR_NAMES[ex["color"]]], float)
    near = np.abs(ex["image"][y0:y1, x0:x1].astype(float) - color).max(-1) <= shapes._NOISE
    assert near[0].any() and near[-1].any() and near[:, 0].any() and near[:, -1].any()
    inside = np.zeros((s, s), bool)
    inside[y0:y1, x0:x1] = True
    bg = np.array(shapes.BACKGROUNDS[shapes.BACKGROUND_NAMES[ex["background"]]], float)
    assert np.abs(ex["image"][~inside].astype(float) - bg).max() <= shapes._NOISE
