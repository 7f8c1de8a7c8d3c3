"""A checkpoint written before the loss guard's skip counters joined the train state resumes:
the counters start at 0 with one line saying so, and the run ends bitwise as an uninterrupted one."""

import os
import shutil

import numpy as np

from conftest import assert_bitwise_equal, final_params

from big_vision_lite import checkpoint, train
from big_vision_lite.data import pipeline

NEW_COUNTERS = ("in_a_row", "most_in_a_row")  # what the guard's state gained


def _older_checkpoint(ref_dir, config, dst_dir):
  """`ref_dir`'s step 4 re-saved into `dst_dir` as a version without NEW_COUNTERS wrote it."""
  setup = train.build(config)
  it = pipeline.make_train_iterator(
      config.input.data, config.input.pp, global_batch_size=config.input.batch_size, seed=config.seed,
      num_workers=0, prefetch_buffer_size=config.input.prefetch)
  try:
    with checkpoint.Checkpointer(os.path.join(ref_dir, "checkpoints"), save_interval_steps=4) as src:
      state = src.restore(4, setup.abstract_state, it)
    old = {**state, "guard": {k: v for k, v in state["guard"].items() if k not in NEW_COUNTERS}}
    with checkpoint.Checkpointer(dst_dir, save_interval_steps=4, async_save=False) as dst:
      dst.save(4, old, it, force=True)
  finally:
    pipeline.close_iterator(it)


def test_checkpoint_without_the_guard_counters_resumes_with_them_at_zero(reference, run_cli, tmp_path):
  ref_dir, config = reference
  work = tmp_path / "w"
  work.mkdir()
  shutil.copy(os.path.join(ref_dir, "config.json"), work / "config.json")
  _older_checkpoint(ref_dir, config, str(work / "checkpoints"))
  saved = checkpoint.read_state_metadata(work / "checkpoints" / "4" / "state")
  assert "guard/count" in saved and not any(f"guard/{k}" in saved for k in NEW_COUNTERS)

  r = run_cli(work, "--config.total_steps=8", "--config.ckpt_steps=4", "--config.log_training_steps=4",
              devices=8)  # the reference ran in this process, on its 8 devices
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 4 " in r.stdout, r.stdout[-2000:]
  notes = [l for l in r.stdout.splitlines() if "guard" in l]
  assert notes == ["note: checkpoint step 4 predates the loss guard's guard/in_a_row, guard/most_in_a_row "
                   "(written by an older version): they start at 0"], r.stdout[-2000:]
  assert "moved aside" not in r.stderr and not any(n.startswith("4.") for n in os.listdir(work / "checkpoints"))
  assert_bitwise_equal(final_params(work, 8), final_params(ref_dir, 8))


def test_a_missing_array_outside_the_guard_is_still_refused(reference, tmp_path):
  """zero_if_missing covers the named subtree only: a checkpoint without a param stays unusable."""
  ref_dir, config = reference
  setup = train.build(config)
  with checkpoint.Checkpointer(os.path.join(ref_dir, "checkpoints"), save_interval_steps=4) as src:
    state = src.restore(4, setup.abstract_state)
  params = dict(state["params"])
  params.pop("head")
  with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=4, async_save=False) as c:
    c.save(4, {**state, "params": params}, force=True)
    try:
      c.restore(4, setup.abstract_state, zero_if_missing=("guard/",))
    except checkpoint.CheckpointError as e:
      assert "missing arrays ['params/head/bias', 'params/head/kernel']" in str(e)
    else:
      raise AssertionError("a checkpoint without params/head restored")
    restored = c.restore(4, {**setup.abstract_state, "params": {
        k: v for k, v in setup.abstract_state["params"].items() if k != "head"}},
        zero_if_missing=("guard/",))
    assert c.zero_filled == []
    np.testing.assert_array_equal(np.asarray(restored["step"]), 4)
