"""Bad training data: undecodable, zero-size, grayscale/alpha/palette images, labels out of
range. Converted where possible, otherwise skipped and counted (deterministic, checkpointable
iterator; the count of skipped records in metrics.jsonl, exact across a resume), and a run stops
past config.input.max_bad_fraction naming the record."""

import io
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from helpers import metric_rows

from big_vision_lite import bad_examples, distributed, run
from big_vision_lite.data import pipeline, sources
from big_vision_lite.data.errors import BadExample, BadInputError
from big_vision_lite.data.ops_image import decode_image

SPEC = "decode|resize(8)|onehot(4, key='label', key_result='labels')|keep('image', 'labels', 'id')"


def _png(mode, size=(6, 5), value=100):
  buf = io.BytesIO()
  color = {"L": value, "LA": (value, 0), "RGBA": (value, 50, 200, 0), "P": value}.get(mode, (value, 1, 2))
  Image.new(mode, size, color).save(buf, "PNG")
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "RGB"])
def test_grayscale_alpha_palette_become_rgb(mode):
  image = decode_image(_png(mode))
  assert image.shape == (5, 6, 3) and image.dtype == np.uint8
  if mode in ("L", "LA"):
    assert (image == 100).all()
  if mode == "RGBA":  # alpha dropped, colour kept
    assert image[0, 0].tolist() == [100, 50, 200]


@pytest.mark.parametrize("value,match", [
    (b"not an image", "cannot decode image in key 'image' \\(12 bytes\\)"),
    (b"", "cannot decode image"),
    (np.zeros((0, 4, 3), np.uint8), "zero-size image"),
])
def test_undecodable_and_zero_size_are_bad_examples(value, match):
  with pytest.raises(BadExample, match=match):
    decode_image(value)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
  """400 records; 2 undecodable, 1 zero-size PNG payload, 1 label out of range, rest fine."""
  path = str(tmp_path_factory.mktemp("dirty") / "d.array_record")
  bad = {17: b"garbage", 123: b"", 250: None, 301: "label"}
  recs = []
  for i in range(400):
    rec = {"image": _png("RGB", value=i % 200), "label": i % 4, "id": i}
    if bad.get(i) == "label":
      rec["label"] = 9
    elif i in bad:
      rec["image"] = bad[i] if bad[i] is not None else np.zeros((0, 0, 3), np.uint8)
    recs.append(rec)
  sources.write_array_record(path, recs)
  return ml_collections.ConfigDict(dict(name="array_record", files=path)), sorted(bad)


def _iter(data, **kw):
  return pipeline.make_train_iterator(data, SPEC, global_batch_size=8, seed=0, process_index=0,
                                      process_count=1, **kw)


def test_skip_drops_counts_and_logs_bad_records(dirty, caplog):
  data, bad = dirty
  it = _iter(data, bad_examples="skip", max_bad_fraction=0.05)
  with caplog.at_level(logging.WARNING, logger="big_vision_lite"):
    ids = np.concatenate([next(it)["id"] for _ in range(50)])  # one epoch
  assert len(ids) == 400 and not set(bad) & set(ids.tolist())
  assert len(set(ids.tolist())) == 396  # every good record once in the first epoch... then epoch 2
  for index in bad:
    assert f"skipping bad example record {index} of " in caplog.text
  assert "label 9 in key 'label' is outside [0, 4)" in caplog.text
  assert "4 bad of" in caplog.text


def test_skipping_iterator_is_deterministic_and_checkpointable(dirty):
  data, _ = dirty
  it = _iter(data, bad_examples="skip", max_bad_fraction=0.05)
  for _ in range(10):
    next(it)
  state = it.get_state()
  want = [next(it)["id"] for _ in range(20)]
  again = _iter(data, bad_examples="skip", max_bad_fraction=0.05)
  again.set_state(state)
  got = [next(again)["id"] for _ in range(20)]
  assert all(np.array_equal(a, b) for a, b in zip(want, got))


def test_too_many_bad_examples_stop_naming_a_record(dirty):
  data, bad = dirty
  # At most 0.001 * max(read, 100) = 0.1 bad allowed so far: the first bad record stops it.
  it = _iter(data, bad_examples="skip", max_bad_fraction=0.001)
  with pytest.raises(BadInputError, match=r"too many bad examples: 1 of \d+ read \(more than "
                     r"config.input.max_bad_fraction=0.001\); last: record (\d+) of array_record"):
    for _ in range(60):
      next(it)


def test_error_policy_stops_at_the_first_bad_record(dirty):
  data, bad = dirty
  it = _iter(data, bad_examples="error")
  with pytest.raises(BadInputError, match=r"bad example, record (17|123|250|301) of .*bad_examples='error'"):
    for _ in range(60):
      next(it)


def _expected_skipped(bad, batch, steps, n=400, seed=0):
  """Reference: bad records among the sampler positions read before each batch's last example
  (one input stream, no workers), walked with the sampler alone."""
  sampler = distributed.GlobalBatchSampler(n, seed=seed, global_batch_size=batch, process_index=0,
                                           process_count=1)
  out, good, skipped, pos = [], 0, 0, 0
  while len(out) < steps:
    if sampler[pos].record_key in bad:
      skipped += 1
    else:
      good += 1
      if good % batch == 0:
        out.append(skipped)
    pos += 1
  return out


@pytest.mark.parametrize("workers", [0, 2])
def test_records_read_gives_the_bad_examples_skipped_and_survives_a_restore(dirty, workers):
  data, bad = dirty
  it = _iter(data, bad_examples="skip", max_bad_fraction=0.05, num_workers=workers)
  skipped, state = [], None
  for step in range(1, 51):  # one epoch and a batch
    next(it)
    skipped.append(pipeline.records_read(it) - 8 * step)
    if step == 20:
      state = it.get_state()
  if workers == 0:
    assert skipped == _expected_skipped(set(bad), 8, 50)
  # Each worker reads its own positions, so when a bad record is met differs, but after the
  # epoch all 4 were skipped, and the count never falls.
  assert skipped[-1] == 4 and skipped == sorted(skipped)
  again = _iter(data, bad_examples="skip", max_bad_fraction=0.05, num_workers=workers)
  again.set_state(state)
  assert pipeline.records_read(again) - 8 * 20 == skipped[19]
  clean = _iter(data, bad_examples="skip", max_bad_fraction=0.05)
  assert pipeline.records_read(clean) == 0
  assert pipeline.records_read(iter([])) is None  # not a grain iterator: no number


def test_trainer_logs_skipped_bad_examples_across_a_resume(dirty, tmp_path):
  data, bad = dirty
  def config(steps):
    c = tiny_config(f"--config.total_steps={steps}", "--config.input.bad_examples=skip",
                    "--config.input.max_bad_fraction=0.05")
    c.input.data = data
    c.input.pp = ("decode|resize(32)|value_range(-1, 1)|onehot(8, key='label', "
                  "key_result='labels')|keep('image', 'labels')")
    return c
  work = str(tmp_path / "run")
  run.train_and_evaluate(config(14), work)
  run.train_and_evaluate(config(28), work)  # resumes at step 14's checkpoint
  rows = [r for r in metric_rows(work) if "skipped_bad_examples" in r]
  assert [r["step"] for r in rows] == list(range(1, 29))
  want = _expected_skipped(set(bad), 16, 28)
  assert [r["skipped_bad_examples"] for r in rows] == want
  assert want[-1] == 4 > want[0]  # the run met every bad record, and not all at once


def test_check_bad_fraction_counts_over_at_least_the_minimum():
  # 0.01 of max(read, 100): 1 bad of 50 read is within (1 <= 1.0), 2 are not.
  bad_examples.check_bad_fraction(1, 50, 0.01, step=3)
  with pytest.raises(BadInputError, match=r"too many bad examples: 2 of the 50 records read by "
                     r"step 3 were bad, over all input processes since step 0 \(more than "
                     r"config.input.max_bad_fraction=0.01\)"):
    bad_examples.check_bad_fraction(2, 50, 0.01, step=3)
  bad_examples.check_bad_fraction(3, 300, 0.01, step=9)
  with pytest.raises(BadInputError, match="4 of the 300"):
    bad_examples.check_bad_fraction(4, 300, 0.01, step=9)
  bad_examples.check_bad_fraction(0, 10, 0.0, step=1)
  with pytest.raises(BadInputError):
    bad_examples.check_bad_fraction(1, 10_000, 0.0, step=1)


def test_trainer_judges_the_bad_fraction_since_step_0_across_a_resume(dirty, tmp_path):
  """The input process's own count restarts at 0 on resume; the trainer's does not.

  Reference counts (batch 16, _expected_skipped): 3 bad of 227 read by step 14, 3 of 243 by
  step 15, and the 4th bad record comes at step 20. Resumed at step 14 under 0.012, the input
  process alone would allow 1.2 bad of its first 100 and never stop; over the whole run 3 of 243
  is past 0.012 at step 15.
  """
  data, bad = dirty
  def config(steps, fraction):
    c = tiny_config(f"--config.total_steps={steps}", "--config.input.bad_examples=skip",
                    f"--config.input.max_bad_fraction={fraction}")
    c.input.data = data
    c.input.pp = ("decode|resize(32)|value_range(-1, 1)|onehot(8, key='label', "
                  "key_result='labels')|keep('image', 'labels')")
    return c
  work = str(tmp_path / "run")
  run.train_and_evaluate(config(14, 0.05), work)
  with pytest.raises(BadInputError, match=r"3 of the 243 records read by step 15 were bad.*"
                     r"max_bad_fraction=0.012"):
    run.train_and_evaluate(config(28, 0.012), work)
  rows = [r for r in metric_rows(work) if "skipped_bad_examples" in r]
  assert rows[-1]["step"] == 15 and rows[-1]["skipped_bad_examples"] == 3  # the count is logged
