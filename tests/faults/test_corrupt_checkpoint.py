"""A corrupted newest checkpoint (truncated files, garbage bytes, a missing array, another
model's checkpoint) is reported with its path, moved aside, and the previous one used;
with no usable checkpoint left the trainer refuses to start from scratch."""

import gc
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import COMMON, ROOT, TINY, steps_on_disk
from helpers import assert_bitwise_equal, final_params

from big_vision_lite import build, checkpoint, restore, train


def _data_files(step_dir):
  state = os.path.join(step_dir, "state")
  return [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs
          if "ocdbt" in r or f == "manifest.ocdbt"]


def _damage(step_dir, kind):
  if kind == "truncated":
    for f in _data_files(step_dir):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif kind == "garbage":
    for f in _data_files(step_dir):
      size = os.path.getsize(f)
      with open(f, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(b"\x5a" * (size - size // 3))
  elif kind == "missing_array":
    md_path = os.path.join(step_dir, "state", "_METADATA")
    with open(md_path) as f:
      md = json.load(f)
    victim = next(k for k in md["tree_metadata"] if "head" in k and "kernel" in k)
    del md["tree_metadata"][victim]
    with open(md_path, "w") as f:
      json.dump(md, f)
  elif kind == "other_model":
    shutil.rmtree(step_dir)
    mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rep = NamedSharding(mesh, P())
    other = {"params": {"dense": {"kernel": jax.device_put(np.ones((3, 5), np.float32), rep)}},
             "step": jax.device_put(np.int32(8), rep)}
    c = checkpoint.Checkpointer(os.path.dirname(step_dir), save_interval_steps=1, async_save=False,
                                max_to_keep=None)
    c.save(8, other)
    c.close()
  else:
    raise ValueError(kind)


# A failed tensorstore read leaves orbax coroutines that complain when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing_array", "other_model"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(reference, tmp_path, kind, capsys):
  ref_dir, config = reference
  work = tmp_path / "w"
  shutil.copytree(ref_dir, work)
  _damage(str(work / "checkpoints" / "8"), kind)
  setup = build.build(config)
  ckpt = checkpoint.Checkpointer(str(work / "checkpoints"), save_interval_steps=4, async_save=False)
  state, start = restore.restore_or_init(setup, config, ckpt, None)
  ckpt.close()
  err = capsys.readouterr().err
  assert start == 4
  assert str(work / "checkpoints" / "8") in err and "moved aside" in err and "\n" == err[-1]
  assert len(err.strip().splitlines()) == 1, err
  assert any(n.startswith("8.unusable-") for n in os.listdir(work / "checkpoints"))
  got = {k: np.asarray(v) for k, v in checkpoint.flatten_with_names(jax.device_get(state["params"])).items()}
  assert_bitwise_equal(got, final_params(ref_dir, 4))
  gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_resumes_past_bad_checkpoints_to_the_same_result(reference, tmp_path, capsys):
  """Step 8 half written, step 4 garbled: the CLI resumes from step 1 and ends bitwise equal."""
  ref_dir, _ = reference
  work = tmp_path / "w"
  shutil.copytree(ref_dir, work)
  os.remove(work / "checkpoints" / "8" / "commit_success.txt")
  _damage(str(work / "checkpoints" / "4"), "garbage")
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(work), *COMMON,
                     "--config.total_steps=8", "--config.ckpt_steps=4", "--config.log_training_steps=4"])
  err = capsys.readouterr().err
  assert code == 0, err
  assert str(work / 'checkpoints' / '4') in err and "trying the previous checkpoint" in err
  assert "Traceback" not in err
  assert steps_on_disk(work)[-2:] == [4, 8]
  assert_bitwise_equal(final_params(work), final_params(ref_dir))
  gc.collect()


def test_all_checkpoints_unusable_refuses_to_start_from_scratch(reference, tmp_path, capsys):
  ref_dir, config = reference
  work = tmp_path / "w"
  shutil.copytree(ref_dir, work)
  steps = steps_on_disk(work)
  for step in steps:
    _damage(str(work / "checkpoints" / str(step)), "missing_array")
  setup = build.build(config)
  ckpt = checkpoint.Checkpointer(str(work / "checkpoints"), save_interval_steps=4, async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match="refusing to train from scratch"):
    restore.restore_or_init(setup, config, ckpt, None)
  ckpt.close()
  err = capsys.readouterr().err
  assert "missing arrays" in err and str(work / "checkpoints" / "4") in err
  names = os.listdir(work / "checkpoints")
  assert sum(".unusable-" in n for n in names) == len(steps)  # kept, not deleted
