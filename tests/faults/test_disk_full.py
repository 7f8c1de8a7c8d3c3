"""Disk full during an (async) save: a one-line CheckpointError naming the directory and the
errno; the previous checkpoint stays complete and restorable."""

import errno
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.path import async_path

from big_vision_lite.checkpoint import CheckpointError, Checkpointer


def _state(seed):
  mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  rep = NamedSharding(mesh, P())
  return {"params": {"w": jax.device_put(np.full((4, 4), seed, np.float32), rep)},
          "step": jax.device_put(np.int32(seed), rep)}


@pytest.mark.parametrize("async_save", [True, False])
def test_enospc_during_save_is_one_clear_error_and_keeps_previous(tmp_path, monkeypatch, async_save):
  c = Checkpointer(str(tmp_path), save_interval_steps=1, async_save=async_save)
  assert c.save(1, _state(1))
  c.wait_until_finished()
  real = async_path.write_text

  async def full_disk(path, text, *a, **k):
    if "commit_success" in str(path):  # the last write of a save: everything else went through
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await real(path, text, *a, **k)
  monkeypatch.setattr(async_path, "write_text", full_disk)
  with pytest.raises(CheckpointError) as e:
    c.save(2, _state(2))
    c.wait_until_finished()  # async: the background write's error surfaces here
  msg = str(e.value)
  assert "\n" not in msg and str(tmp_path) in msg and "No space left on device" in msg
  assert "newest complete checkpoint (left intact): step 1" in msg
  monkeypatch.setattr(async_path, "write_text", real)

  c2 = Checkpointer(str(tmp_path), save_interval_steps=1)
  assert c2.latest_step() == 1
  restored = c2.restore(None, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           _state(0)))
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((4, 4), 1, np.float32))
  c2.close()
  try:
    c.close()
  except CheckpointError:
    pass
