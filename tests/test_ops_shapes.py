"""The shapes ops: shapes_caption (full captions reproduce the dataset's, partial ones keep the
shape word) and shapes_as_multi (a bvl_shapes example in bvl_shapes_multi's layout)."""

import numpy as np
import pytest

from big_vision_lite.data import ops, shapes


def _example(i: int) -> dict:
  rng = np.random.default_rng(i)
  color = int(rng.integers(len(shapes.COLOR_NAMES)))
  ex = dict(label=int(rng.integers(8)), color=color, size=int(rng.integers(3)),
            background=int(rng.integers(len(shapes.BACKGROUND_NAMES))),
            position=int(rng.integers(9)))
  ex["caption"] = shapes.caption_for(
      shapes.CLASS_NAMES[ex["label"]], shapes.COLOR_NAMES[color], shapes.SIZE_NAMES[ex["size"]],
      shapes.BACKGROUND_NAMES[ex["background"]], shapes.POSITION_NAMES[ex["position"]])
  return ex


def test_keep_all_is_the_dataset_caption():
  op = ops.get_preprocess_fn("shapes_caption(1.0, key_result='new')")
  for i in range(30):
    ex = _example(i)
    assert op(ex, None)["new"] == ex["caption"]


def test_partial_captions_keep_the_shape_and_the_word_order():
  op = ops.get_preprocess_fn("shapes_caption(0.5, key_result='new')")
  rng = np.random.default_rng(0)
  lengths = set()
  for i in range(200):
    ex = _example(i)
    new = op(ex, rng)["new"]
    assert shapes.CLASS_NAMES[ex["label"]] in new.split()
    full = ex["caption"].split()
    it = iter(full)
    assert all(w in it for w in new.split()), (new, ex["caption"])  # an ordered subsequence
    lengths.add(len(new.split()))
  assert min(lengths) == 2 and max(lengths) >= 12  # "a circle" ... the full caption


def test_same_rng_same_caption_and_bad_arguments():
  op = ops.get_preprocess_fn("shapes_caption(0.5)")
  a = [op(_example(i), np.random.default_rng(7))["caption"] for i in range(5)]
  b = [op(_example(i), np.random.default_rng(7))["caption"] for i in range(5)]
  assert a == b
  with pytest.raises(ValueError, match="keep_prob"):
    ops.get_preprocess_fn("shapes_caption(1.5)")
  with pytest.raises(ValueError, match="rng"):
    op(_example(0), None)


def test_shapes_as_multi_gives_the_several_object_layout_and_its_region():
  ex = shapes.generate_example("train", 3)
  out = ops.get_preprocess_fn("shapes_as_multi|shapes_multi_regions")(dict(ex))
  assert int(out["num_objects"]) == 1
  np.testing.assert_array_equal(out["labels"], [ex["label"], 0, 0])
  np.testing.assert_array_equal(out["colors"], [ex["color"], 0, 0])
  np.testing.assert_array_equal(out["sizes"], [ex["size"], 0, 0])
  np.testing.assert_array_equal(out["boxes"], np.stack([ex["box"], np.zeros(4), np.zeros(4)]))
  assert out["caption"] == ex["caption"] and out["background"] == ex["background"]
  assert not {"label", "color", "size", "position", "box"} & set(out)
  assert out["region_texts"] == [f"the {shapes.COLOR_NAMES[ex['color']]} {shapes.CLASS_NAMES[ex['label']]}"]
  np.testing.assert_array_equal(out["region_boxes"], ex["box"][None])
