"""A step folder that cannot be read for lack of permissions is reported as such, not as an
interrupted save. (Root ignores file modes, so the denial is simulated at os.stat.)"""

import errno
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite import checkpoint, checkpoint_layout


def test_unreadable_step_names_the_permission_error(tmp_path, monkeypatch):
  mesh = jax.make_mesh((8, 1, 1, 1), ("data", "fsdp", "tensor", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  state = {"w": jax.device_put(np.ones((4, 4), np.float32), NamedSharding(mesh, P()))}
  c = checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False)
  c.save(1, state)
  c.save(2, state)
  c.close()
  denied = str(tmp_path / "2") + os.sep
  real = os.stat

  def stat(path, *a, **k):
    if str(path).startswith(denied):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return real(path, *a, **k)
  monkeypatch.setattr(os, "stat", stat)
  complete, incomplete = checkpoint_layout.scan_steps(tmp_path)
  assert complete == [1]
  assert "Permission denied" in incomplete[2] and "interrupted" not in incomplete[2], incomplete[2]
