"""bvl_shapes_multi: deterministic examples, unique referring expressions, boxes of the drawn
pixels, and the built dataset reading back what was generated."""

import numpy as np

from big_vision_lite.data import shapes, shapes_multi


def test_examples_are_a_pure_function_of_seed_split_index():
  for i in range(20):
    a, b = shapes_multi.generate_example("train", i), shapes_multi.generate_example("train", i)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert np.array_equal(a["boxes"], b["boxes"])
  a, b = shapes_multi.generate_example("train", 0), shapes_multi.generate_example("validation", 0)
  assert not np.array_equal(a["image"], b["image"])
  c = shapes_multi.generate_example("train", 0, seed=1)
  assert not np.array_equal(a["image"], c["image"])


def test_objects_are_unique_boxed_and_captioned_left_to_right():
  counts = set()
  for i in range(200):
    ex = shapes_multi.generate_example("validation", i)
    n = ex["num_objects"]
    counts.add(n)
    pairs = [(ex["colors"][k], ex["labels"][k]) for k in range(n)]
    assert len(set(pairs)) == n, (i, pairs)  # "the red circle" names one object
    boxes = ex["boxes"][:n]
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, :2] < boxes[:, 2:])
    assert np.all(ex["boxes"][n:] == 0)
    # Objects left to right: the caption names them in the slots' order.
    names = [f"{shapes.SIZE_NAMES[ex['sizes'][k]]} {shapes.COLOR_NAMES[ex['colors'][k]]} "
             f"{shapes.CLASS_NAMES[ex['labels'][k]]}" for k in range(n)]
    assert ex["caption"] == " and ".join(f"a {s}" for s in names) + \
        f" on a {shapes.BACKGROUND_NAMES[ex['background']]} background"
  assert counts == {1, 2, 3}


def test_box_bounds_the_objects_pixels():
  # Outside every box the image is background plus noise; inside, the shape's colour shows.
  for i in range(30):
    ex = shapes_multi.generate_example("train", i)
    bg = np.array(shapes.BACKGROUNDS[shapes.BACKGROUND_NAMES[ex["background"]]], float)
    s = ex["image"].shape[0]
    inside = np.zeros((s, s), bool)
    for k in range(ex["num_objects"]):
      y0, x0, y1, x1 = np.round(ex["boxes"][k] * s).astype(int)
      inside[y0:y1, x0:x1] = True
      color = np.array(shapes.COLORS[shapes.COLOR_NAMES[ex["colors"][k]]], float)
      patch = ex["image"][y0:y1, x0:x1].astype(float)
      assert np.any(np.abs(patch - color).max(-1) <= shapes._NOISE)
      # The box is tight: each edge row/column holds a pixel of the shape.
      near = np.abs(patch - color).max(-1) <= shapes._NOISE
      assert near[0].any() and near[-1].any() and near[:, 0].any() and near[:, -1].any()
    outside = np.abs(ex["image"][~inside].astype(float) - bg).max(-1)
    assert outside.max() <= shapes._NOISE


def test_built_tiny_split_reads_back_the_generated_examples(tmp_path):
  import ml_collections
  from big_vision_lite.data import sources
  src = sources.get_source(ml_collections.ConfigDict(
      dict(name="bvl_shapes_multi/tiny", split="validation", data_dir=str(tmp_path))))
  assert len(src) == shapes.NUM_VALIDATION_TINY
  # tfds stores the records in its own (hashed-key) order: match them by image bytes.
  want = {}
  for i in range(len(src)):
    ex = shapes_multi.generate_example("validation", i)
    want[shapes.encode_png(ex["image"])] = ex
  for i in range(len(src)):
    got = src[i]
    ex = want.pop(got["image"])
    assert got["caption"].decode() == ex["caption"] and got["num_objects"] == ex["num_objects"]
    np.testing.assert_array_equal(got["boxes"], ex["boxes"])
    np.testing.assert_array_equal(got["colors"], ex["colors"])
  assert not want
