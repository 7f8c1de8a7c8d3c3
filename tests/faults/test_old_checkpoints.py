"""Checkpoints of the layout before the loss guard moved into the optimizer state resume.

That layout had a top-level `guard` dict {losses, count, nonfinite, spikes, first_nonfinite,
and in later versions in_a_row, most_in_a_row} and an `opt_state` without a LossGuardState.
The tests write such checkpoints with Orbax from the reference run's step 4 (arranged here by
hand, not with the package's mapping), resume them through the CLI and compare the whole step-8
state with the uninterrupted run's.
"""

import os
import shutil

import jax
import pytest

from helpers import assert_bitwise_equal, final_params

from big_vision_lite import build, checkpoint, checkpoint_layout, loss_guard, restore
from big_vision_lite.data import pipeline

NEW_COUNTERS = ("in_a_row", "most_in_a_row")  # what the old layout's guard gained last
OLDEST_FIELDS = ("losses", "count", "nonfinite", "spikes", "first_nonfinite")


def _iterator(config):
  return pipeline.make_train_iterator(
      config.input.data, config.input.pp, global_batch_size=config.input.batch_size,
      seed=config.seed, num_workers=0, prefetch_buffer_size=config.input.prefetch)


def _restore(ckpt_dir, step, setup, data_iter=None):
  with checkpoint.Checkpointer(ckpt_dir, save_interval_steps=4) as src:
    return src.restore(step, setup.abstract_state, data_iter)


def _old_layout(state, fields):
  """`state` as the previous version laid it out, its guard holding only `fields`."""
  g = state["opt_state"]
  assert isinstance(g, loss_guard.LossGuardState)  # the guard wraps the whole optimizer
  return {"params": state["params"], "opt_state": g.inner_state, "step": state["step"],
          "rng": state["rng"], "guard": {k: getattr(g, k) for k in fields}}


def _write_old_checkpoint(ref_dir, config, dst_dir, fields):
  """`ref_dir`'s step 4 (with its data iterator state) re-saved into `dst_dir` in the old layout."""
  setup = build.build(config)
  it = _iterator(config)
  try:
    state = _restore(os.path.join(ref_dir, "checkpoints"), 4, setup, it)
    with checkpoint.Checkpointer(dst_dir, save_interval_steps=4, async_save=False) as dst:
      dst.save(4, _old_layout(state, fields), it, force=True)
  finally:
    pipeline.close_iterator(it)
  return setup


@pytest.mark.parametrize("fields", [OLDEST_FIELDS, OLDEST_FIELDS + NEW_COUNTERS],
                         ids=["without_run_counters", "with_run_counters"])
def test_old_layout_resumes_and_ends_bitwise_as_uninterrupted(reference, run_cli, tmp_path, fields):
  ref_dir, config = reference
  work = tmp_path / "w"
  work.mkdir()
  shutil.copy(os.path.join(ref_dir, "config.json"), work / "config.json")
  setup = _write_old_checkpoint(ref_dir, config, str(work / "checkpoints"), fields)
  saved = checkpoint_layout.read_state_metadata(work / "checkpoints" / "4" / "state")
  assert sorted(k for k in saved if k.startswith("guard/")) == sorted(f"guard/{k}" for k in fields)
  assert not any(k.startswith("opt_state/inner_state") or k == "opt_state/count" for k in saved)

  r = run_cli(work, "--config.total_steps=8", "--config.ckpt_steps=4",
              "--config.log_training_steps=4", devices=8)  # the reference ran on 8 devices
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 4 " in r.stdout, r.stdout[-2000:]
  notes = [line for line in r.stdout.splitlines() if "guard" in line]
  expected = ("note: checkpoint step 4 has the loss guard's state in a top-level guard/ (an older "
              "layout): read into opt_state")
  if fields == OLDEST_FIELDS:
    expected += ("; it predates the loss guard's guard/in_a_row, guard/most_in_a_row (written by "
                 "an older version): they start at 0")
  assert notes == [expected], r.stdout[-2000:]
  assert "moved aside" not in r.stderr
  assert not any(n.startswith("4.") for n in os.listdir(work / "checkpoints"))

  # Step 8 is written in the current layout and equals the uninterrupted run's, bit for bit.
  assert_bitwise_equal(final_params(work, 8), final_params(ref_dir, 8))
  resumed = _restore(str(work / "checkpoints"), 8, setup)
  uninterrupted = _restore(os.path.join(ref_dir, "checkpoints"), 8, setup)
  assert_bitwise_equal(checkpoint.flatten_with_names(jax.device_get(resumed)),
                       checkpoint.flatten_with_names(jax.device_get(uninterrupted)))
  assert int(loss_guard.find(resumed["opt_state"]).count) == 8


def test_old_layout_missing_a_param_is_refused(reference, tmp_path, capsys):
  """Only the run counters may be missing: an old-layout checkpoint without a param is unusable."""
  ref_dir, config = reference
  setup = build.build(config)
  state = _old_layout(_restore(os.path.join(ref_dir, "checkpoints"), 4, setup), OLDEST_FIELDS)
  state["params"] = {k: v for k, v in state["params"].items() if k != "head"}
  with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=4, async_save=False) as c:
    c.save(4, state, force=True)
  with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=4) as c:
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
      restore.restore_or_init(setup, config, c, None)
  err = capsys.readouterr().err
  assert "missing arrays ['params/head/bias', 'params/head/kernel']" in err, err
  assert [n.split(".")[1].split("-")[0] for n in os.listdir(tmp_path) if n.startswith("4.")] == \
      ["unusable"]
