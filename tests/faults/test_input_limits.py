"""Input limits: an image over the decode op's pixel budget is a bad example, judged from its
header before decoding; tar groups lacking an image or a caption count as bad examples."""

import io
import logging
import struct
import tarfile
import zlib

import ml_collections
import pytest
from PIL import Image

from big_vision_lite.data import ops, pipeline
from big_vision_lite.data.errors import BadExample, BadInputError
from big_vision_lite.data.ops_image import decode_image


def _png(size, value=100) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, (value, 1, 2)).save(buf, "PNG")
  return buf.getvalue()


def _claims(width: int, height: int) -> bytes:
  """A 1x1 PNG whose header claims width x height (a decompression bomb's header, 70 bytes)."""
  data = bytearray(_png((1, 1)))
  ihdr = data[12:29]  # b"IHDR" + 13 bytes; the 4-byte CRC follows
  ihdr[4:12] = struct.pack(">II", width, height)
  data[12:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
  return bytes(data)


def test_header_over_the_default_budget_is_refused_before_decoding():
  # 144 megapixels: over PIL's 89M warning size, under its 179M error size.
  with pytest.raises(BadExample, match=r"12000x12000 = 144000000 pixels is over the pixel budget of 89478485"):
    decode_image(_claims(12000, 12000))


def test_budget_is_configurable_in_the_op():
  op = ops.get_preprocess_fn("decode(max_pixels=1000)")
  assert op({"image": _png((40, 25))}, None)["image"].shape == (25, 40, 3)
  with pytest.raises(BadExample, match="1600 pixels is over the pixel budget of 1000"):
    op({"image": _png((40, 40))}, None)


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
  """150 good groups, one with a 40x40 image (over a budget of 1000), one without caption, one without image."""
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    for i in range(150):
      _add(tar, f"{i:05d}.png", _png((8, 8), i))
      _add(tar, f"{i:05d}.txt", f"caption {i}".encode())
    _add(tar, "big.png", _png((40, 40)))
    _add(tar, "big.txt", b"too big")
    _add(tar, "nocap.png", _png((8, 8)))
    _add(tar, "noimg.txt", b"no image")
  return ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "*.tar"), split="train"))


SPEC = "decode(max_pixels=1000)|resize(8)|keep('image')"


def test_over_budget_and_incomplete_tar_groups_count_as_bad(shards, caplog):
  with caplog.at_level(logging.WARNING, "big_vision_lite"):
    it = pipeline.make_train_iterator(shards, SPEC, global_batch_size=16, seed=0, process_index=0,
                                      process_count=1, bad_examples="skip", max_bad_fraction=0.05)
  assert "2 of the 153 example groups of tar:train were skipped (first: key 'nocap'" in caplog.text
  batches = 20  # 320 records: more than two epochs of the 151 indexed, so the 40x40 one is read
  for _ in range(batches):
    next(it)
  assert pipeline.records_read(it) - batches * 16 >= 2


def test_incomplete_tar_groups_stop_under_error_and_past_the_fraction(shards):
  kw = dict(global_batch_size=16, seed=0, process_index=0, process_count=1)
  with pytest.raises(BadInputError, match=r"2 of the 153 example groups .* \(config.input.bad_examples='error'\)"):
    pipeline.make_train_iterator(shards, SPEC, bad_examples="error", **kw)
  with pytest.raises(BadInputError, match="too many bad examples: 2 of the 153"):
    pipeline.make_train_iterator(shards, SPEC, bad_examples="skip", max_bad_fraction=0.01, **kw)
