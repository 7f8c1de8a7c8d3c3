"""LocCa targets: coordinate-token quantisation round trip, box IoU against a NumPy loop, the
cap / aref / gcap sequences the locca_targets op writes, and the siglip2 task's loss on them."""

import numpy as np
import pytest

from big_vision_lite import locca
from big_vision_lite.data import ops, shapes_multi
from big_vision_lite.data.tokenizers import get_tokenizer


def test_quantize_round_trip_is_within_half_a_bin():
  bins = 32
  c = np.random.default_rng(0).uniform(0, 1, size=10_000)
  back = locca.dequantize(locca.quantize(c, bins), bins)
  # Each value lies in its bin, whose centre is at most half a bin away (plus fp64 rounding).
  assert np.max(np.abs(back - c)) <= 0.5 / bins + 1e-12
  k = np.arange(bins)
  assert np.array_equal(locca.quantize(locca.dequantize(k, bins), bins), k)  # centres map back
  edges = locca.quantize(np.array([0.0, 1.0, -0.2, 1.3]), bins)
  assert edges.tolist() == [0, bins - 1, 0, bins - 1]


def test_box_tokens_round_trip_and_validity():
  vocab = locca.Vocab(text_size=46, bins=16)
  layout = (vocab.task_id("cap"), vocab.task_id("gcap"), vocab.coord_offset, vocab.size)
  assert layout == (46, 48, 49, 65)
  box = np.array([[0.1, 0.2, 0.55, 0.9], [0.0, 0.0, 1.0, 1.0]])
  tokens = locca.box_to_tokens(box, vocab)
  assert tokens.min() >= vocab.coord_offset and tokens.max() < vocab.size
  back, valid = locca.tokens_to_box(tokens, vocab)
  assert valid.all() and np.max(np.abs(back - box)) <= 0.5 / 16 + 1e-12
  bad = np.array([[5, 50, 60, 60], [60, 50, 50, 60]])  # a text token; ymin > ymax
  assert locca.tokens_to_box(bad, vocab)[1].tolist() == [False, False]


def _iou_loop(a, b):
  out = np.zeros(len(a))
  for i, (p, q) in enumerate(zip(a, b)):
    ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - ih * iw
    out[i] = ih * iw / union if union > 0 else 0.0
  return out


def test_box_iou_matches_numpy_loop_and_jax():
  rng = np.random.default_rng(1)
  corners = rng.uniform(0, 1, size=(2, 500, 2, 2))
  # (ymin, xmin, ymax, xmax) from two random corners.
  a, b = (np.concatenate([c.min(1), c.max(1)], axis=-1) for c in corners)
  b[:10] = a[:10]  # identical boxes: IoU 1
  b[10:20] = a[10:20] + np.array([2.0, 2.0, 2.0, 2.0])  # disjoint: IoU 0
  ref = _iou_loop(a, b)
  got = locca.box_iou(a, b)
  np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
  assert np.all(got[:10] == 1.0) and np.all(got[10:20] == 0.0)
  jnp = pytest.importorskip("jax.numpy")
  got32 = np.asarray(locca.box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  # fp32: a few roundings of values <= 1 and one division.
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(got32, ref, rtol=16 * eps, atol=8 * eps)


def _targets(example, bins=32, rng=None):
  fn = ops.get_preprocess_fn(f"shapes_multi_regions|locca_targets({bins}, 22, 3)")
  return fn(example, rng) if rng is not None else fn(example)


def test_locca_targets_sequences():
  tok = get_tokenizer("bvl_shapes")
  vocab = locca.Vocab(tok.vocab_size, 32)
  ex = shapes_multi.generate_example("train", 5)
  out = _targets(ex, rng=np.random.default_rng(0))
  # Captioning: <cap>, the full caption, eos; scored from the caption on.
  cap = tok.encode(ex["caption"])
  assert out["cap_tokens"][:len(cap) + 2].tolist() == [vocab.task_id("cap")] + cap + [tok.eos_id]
  assert out["cap_weights"].tolist() == [0.0] + [1.0] * (len(cap) + 1) + [0.0] * (22 - len(cap) - 2)
  # aref: <aref>, the expression (padded to 3), then the region's 4 coordinate tokens and eos.
  k = [i for i in range(ex["num_objects"]) if np.array_equal(ex["boxes"][i], out["aref_box"])]
  assert len(k) == 1
  expr = tok.encode(out["region_texts"][k[0]])
  box = locca.box_to_tokens(ex["boxes"][k[0]], vocab).tolist()
  assert out["aref_tokens"].tolist() == [vocab.task_id("aref")] + expr + box + [tok.eos_id]
  assert out["aref_weights"].tolist() == [0.0] * 4 + [1.0] * 5
  # gcap: <gcap>, the same box, then the expression and eos.
  assert out["gcap_tokens"].tolist() == [vocab.task_id("gcap")] + box + expr + [tok.eos_id]
  assert out["gcap_weights"].tolist() == [0.0] * 5 + [1.0] * 4


def test_locca_targets_draws_each_region():
  ex = next(shapes_multi.generate_example("train", i) for i in range(100)
            if shapes_multi.generate_example("train", i)["num_objects"] == 3)
  seen = {tuple(_targets(ex, rng=np.random.default_rng(s))["aref_box"]) for s in range(40)}
  assert len(seen) == 3
  assert tuple(_targets(ex)["aref_box"]) == tuple(ex["boxes"][0])  # no rng: the first region


def test_locca_targets_refuses_a_caption_that_does_not_fit():
  ex = shapes_multi.generate_example("train", 0)
  ex["caption"] = " ".join(["a"] * 30)
  with pytest.raises(ValueError, match="caption .* more than 20"):
    _targets(ex)


def test_json_regions_feed_locca_targets_as_shapes_regions_do():
  """A tar shard's KEY.json regions give the same targets as the same regions of bvl_shapes_multi."""
  import json
  ex = shapes_multi.generate_example("train", 5)
  ref = _targets(ex, rng=np.random.default_rng(0))
  regions = ops.get_preprocess_fn("shapes_multi_regions")(ex)
  raw = json.dumps({"regions": [{"text": t, "box": b.tolist()} for t, b in
                                zip(regions["region_texts"], regions["region_boxes"])]})
  got = ops.get_preprocess_fn("json_regions|locca_targets(32, 22, 3)")(
      {"caption": ex["caption"], "json": raw.encode()}, np.random.default_rng(0))
  for k in ("cap_tokens", "aref_tokens", "gcap_tokens", "aref_weights", "aref_box"):
    np.testing.assert_array_equal(got[k], ref[k])


@pytest.mark.parametrize("raw,match", [
    (b"not json", "is not"), (b'{"regions": []}', "no regions"),
    (b'{"regions": [{"text": "a", "box": [0, 0, 2, 1]}]}', r"in \[0, 1\]"),
    (b'{"regions": [{"box": [0, 0, 1, 1]}]}', "is not")])
def test_json_regions_refuses_bad_annotations(raw, match):
  with pytest.raises(ValueError, match=match):
    ops.get_preprocess_fn("json_regions")({"json": raw})


def test_locca_targets_truncate_cuts_a_long_caption():
  ex = shapes_multi.generate_example("train", 0)
  ex["caption"] = " ".join(["a"] * 30)
  out = ops.get_preprocess_fn("shapes_multi_regions|locca_targets(32, 22, 3, truncate=True)")(ex)
  tok = get_tokenizer("bvl_shapes")
  assert out["cap_tokens"][1:21].tolist() == tok.encode("a")[:1] * 20
  assert out["cap_tokens"][21] == tok.eos_id
