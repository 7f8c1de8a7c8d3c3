"""Flipped bits in a checkpoint's array data, and an edited (still valid) data-iterator state, are
caught by the digests written at save: the step is moved aside and the previous one used."""

import gc
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from helpers import assert_bitwise_equal, final_params

from big_vision_lite import build, checkpoint, restore, run


def _data_files(step_dir):
  """Every OCDBT data file of a step's state (the merged root's and each process's), largest first."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.path.basename(r) == "d"]
  return sorted(files, key=lambda f: (-os.path.getsize(f), f))


def _edit_one_value(step_dir, name):
  """Rewrites one float of array `name` ("params.embedding.kernel") through tensorstore itself.

  The result is a well-formed checkpoint (tensorstore's CRCs and zstd frames all valid) holding a
  value that training never produced: what only the digests can catch.
  """
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{step_dir}/state",
                                        "path": name + "/"}}
  array = ts.open(spec).result()
  values = array.read().result()
  flat = values.reshape(-1).copy()
  flat[0] = np.nextafter(flat[0], np.float32(np.inf))
  array.write(flat.reshape(values.shape)).result()


def _flip(path, offset, bit):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


def _params(state):
  return {k: np.asarray(v) for k, v in checkpoint.flatten_with_names(jax.device_get(state["params"])).items()}


def _restore_unchecked(directory, step, abstract_state):
  """What orbax alone restores (no digest check), to learn whether a flip changed any value."""
  c = checkpoint.Checkpointer(directory, save_interval_steps=4, async_save=False)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  state = c._manager.restore(step, args=args)["state"]
  c.close()
  return {k: np.asarray(v) for k, v in checkpoint.flatten_with_names(jax.device_get(state)).items()}


# A failed tensorstore read leaves orbax coroutines that complain when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bit_in_array_data_never_loads_silently(reference, tmp_path):
  """Single-bit flips over every data file: a restore refuses exactly those that change a value.

  Which bytes of which file hold values (not B-tree nodes, headers or bytes no restore reads)
  depends on the trained numbers, so on another CPU another file holds them: the flips walk every
  data file until two have changed values (or eight reached them), each flip that reaches one
  either noticed by tensorstore itself (a CRC, a zstd frame) or changing a value silently, which
  the digests must refuse.
  """
  ref_dir, config = reference
  setup = build.build(config)
  clean = _restore_unchecked(os.path.join(ref_dir, "checkpoints"), 8, setup.abstract_state)
  reached = changed = 0
  n_files = len(_data_files(os.path.join(ref_dir, "checkpoints", "8")))
  positions = [(i, where) for where in np.linspace(0.03, 0.97, 8) for i in range(n_files)]
  for n, (i, where) in enumerate(positions):
    work = tmp_path / str(n)
    shutil.copytree(os.path.join(ref_dir, "checkpoints"), work)
    victim = _data_files(str(work / "8"))[i]
    _flip(victim, int(os.path.getsize(victim) * where), 3)
    try:
      flipped = _restore_unchecked(str(work), 8, setup.abstract_state)
    except Exception:  # noqa: BLE001 - tensorstore noticed by itself (a CRC, a zstd frame)
      reached += 1
      shutil.rmtree(work)
      continue
    differs = [k for k in clean if not np.array_equal(clean[k], flipped[k])]
    ckpt = checkpoint.Checkpointer(str(work), save_interval_steps=4, async_save=False)
    if differs:
      reached += 1
      changed += 1
      with pytest.raises(checkpoint.CheckpointError, match="do not match their digest"):
        ckpt.restore(8, setup.abstract_state)
    else:
      ckpt.restore(8, setup.abstract_state)
    ckpt.close()
    shutil.rmtree(work)
    if changed >= 2 or reached >= 8:
      break
  assert reached >= 2, f"{len(positions)} flips over {n_files} data files reached no array value"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_array_step_is_set_aside_and_previous_used(reference, tmp_path, capsys):
  ref_dir, config = reference
  setup = build.build(config)
  clean = _restore_unchecked(os.path.join(ref_dir, "checkpoints"), 8, setup.abstract_state)
  work = tmp_path / "w"
  shutil.copytree(ref_dir, work)
  _edit_one_value(str(work / "checkpoints" / "8"), "params.embedding.kernel")
  edited = _restore_unchecked(str(work / "checkpoints"), 8, setup.abstract_state)
  assert [k for k in clean if not np.array_equal(clean[k], edited[k])] == ["params/embedding/kernel"]
  ckpt = checkpoint.Checkpointer(str(work / "checkpoints"), save_interval_steps=4, async_save=False)
  state, start = restore.restore_or_init(setup, config, ckpt, None)
  ckpt.close()
  err = capsys.readouterr().err
  assert start == 4, "a corrupted step 8 was restored"
  assert "moved aside" in err and "do not match their digest" in err and len(err.strip().splitlines()) == 1
  assert any(n.startswith("8.unusable-") for n in os.listdir(work / "checkpoints"))
  assert_bitwise_equal(_params(state), final_params(ref_dir, 4))
  gc.collect()


def test_unflipped_checkpoint_restores_with_digests_checked(reference):
  ref_dir, config = reference
  assert os.path.isdir(os.path.join(ref_dir, "checkpoints", "8", checkpoint.DIGEST_ITEM))
  setup = build.build(config)
  ckpt = checkpoint.Checkpointer(os.path.join(ref_dir, "checkpoints"), save_interval_steps=4,
                                 async_save=False)
  state = ckpt.restore(8, setup.abstract_state)
  ckpt.close()
  assert_bitwise_equal(_params(state), final_params(ref_dir, 8))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_edited_data_iterator_state_is_set_aside(reference, tmp_path, capsys):
  """A valid but changed iterator position in step 8: resumed from step 4, same end result."""
  ref_dir, config = reference
  work = tmp_path / "w"
  shutil.copytree(ref_dir, work)
  data_dir = work / "checkpoints" / "8" / "data"
  path = data_dir / "process_0-of-1.json"
  state = json.loads(path.read_text())
  state["last_seen_indices"] = {k: v + 16 for k, v in state["last_seen_indices"].items()}
  path.write_text(json.dumps(state, indent=4))
  run.train_and_evaluate(config, str(work))
  err = capsys.readouterr().err
  assert "data iterator state" in err and "does not match its digest" in err, err
  assert any(n.startswith("8.unusable-") for n in os.listdir(work / "checkpoints"))
  assert_bitwise_equal(final_params(work), final_params(ref_dir))
  gc.collect()
