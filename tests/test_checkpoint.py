"""Tests for big_vision_lite.checkpoint: save/restore, retention, incomplete and
corrupt checkpoints, restore onto another mesh, SIGTERM preemption."""

import gc
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite import checkpoint as ck
from big_vision_lite.checkpoint import CheckpointError, Checkpointer

AXES = ("data", "fsdp", "tensor", "expert")


def mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def make_state(m, seed=0, spec=P("fsdp")):
  w = np.arange(64, dtype=np.float32).reshape(8, 8) + seed
  b = np.full((8,), seed, np.float32)
  rep = NamedSharding(m, P())
  return {
      "params": {"w": jax.device_put(w, NamedSharding(m, spec)), "b": jax.device_put(b, rep)},
      "opt_state": {"mu": jax.device_put(w * 2, NamedSharding(m, spec))},
      "step": jax.device_put(jnp.int32(seed), rep),
      "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), rep),
  }


def abstract(state, m, spec):
  """ShapeDtypeStructs: rank-2 arrays get `spec` on `m`, the rest replicated."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=NamedSharding(m, spec if x.ndim == 2 else P())), state)


def assert_tree_equal(a, b):
  ja, jb = jax.tree.structure(a), jax.tree.structure(b)
  assert ja == jb
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def loader():
  return grain.DataLoader(
      data_source=grain.sources.RangeDataSource(0, 100, 1),
      sampler=grain.samplers.IndexSampler(100, shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=1, seed=7),
      operations=[grain.transforms.Batch(4)], worker_count=0)


def test_save_restore_state_and_data_iterator(tmp_path):
  m = mesh((2, 4, 1, 1))
  state = make_state(m, seed=3)
  it = iter(loader())
  for _ in range(3):
    next(it)
  c = Checkpointer(str(tmp_path), save_interval_steps=1, async_save=True)
  assert c.save(3, state, it)
  for _ in range(2):  # Moving on must not change what was saved.
    next(it)
  c.wait_until_finished()
  c.close()

  reference = iter(loader())
  expected = [next(reference) for _ in range(6)][3:]
  c2 = Checkpointer(str(tmp_path), save_interval_steps=1)
  assert c2.latest_step() == 3 and c2.all_steps() == [3]
  it2 = iter(loader())
  restored = c2.restore(None, abstract(state, m, P("fsdp")), it2)
  assert_tree_equal(restored, state)
  for want in expected:
    np.testing.assert_array_equal(next(it2), want)
  # The data item is optional on restore (e.g. evaluating a checkpoint).
  assert_tree_equal(c2.restore(3, abstract(state, m, P("fsdp"))), state)
  c2.close()


def test_retention_interval_and_force(tmp_path):
  m = mesh((8, 1, 1, 1))
  c = Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2, async_save=False)
  started = [s for s in range(10) if c.save(s, make_state(m, s, P()))]
  assert started == [0, 2, 4, 6, 8]
  assert c.all_steps() == [6, 8]
  assert c.save(9, make_state(m, 9, P()), force=True)
  assert c.all_steps() == [8, 9]
  assert not c.save(9, make_state(m, 9, P()), force=True)  # Already there: no-op.
  c.close()


def test_incomplete_checkpoints_are_skipped_and_set_aside(tmp_path, caplog):
  m = mesh((8, 1, 1, 1))
  c = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None, async_save=False)
  for s in (1, 2):
    c.save(s, make_state(m, s, P()))
  c.wait_until_finished()
  # A run killed mid-save, three ways: no commit marker, a missing state
  # metadata file, and orbax's own tmp folder.
  shutil.copytree(tmp_path / "2", tmp_path / "5")
  os.remove(tmp_path / "5" / "commit_success.txt")
  shutil.copytree(tmp_path / "2", tmp_path / "6")
  os.remove(tmp_path / "6" / "state" / "_METADATA")
  shutil.copytree(tmp_path / "2", tmp_path / "7.orbax-checkpoint-tmp-1234")
  with caplog.at_level("WARNING"):
    assert c.latest_step() == 2
  assert str(tmp_path / "5") in caplog.text and str(tmp_path / "6") in caplog.text
  assert c.all_steps() == [1, 2]
  restored = c.restore(None, abstract(make_state(m), m, P()))
  assert int(restored["step"]) == 2
  with pytest.raises(CheckpointError, match=r"5.*commit_success"):
    c.restore(5, abstract(make_state(m), m, P()))
  c.close()

  # A resumed run moves them aside (kept, not deleted) and can save those steps.
  c2 = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None, async_save=False)
  names = sorted(os.listdir(tmp_path))
  assert any(n.startswith("5.incomplete-") for n in names)
  assert any(n.startswith("6.incomplete-") for n in names)
  assert c2.save(5, make_state(m, 5, P()))
  assert c2.latest_step() == 5
  c2.close()


def test_restore_onto_different_meshes(tmp_path):
  src = mesh((2, 4, 1, 1))
  state = make_state(src, seed=1, spec=P("fsdp"))
  c = Checkpointer(str(tmp_path), save_interval_steps=1)
  c.save(1, state)
  c.wait_until_finished()
  for shape, spec in (((8, 1, 1, 1), P()), ((1, 1, 8, 1), P(None, "tensor"))):
    dst = mesh(shape)
    target = abstract(state, dst, spec)
    restored = c.restore(1, target, None)
    assert_tree_equal(restored, state)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
      assert r.sharding.is_equivalent_to(t.sharding, r.ndim), (r.sharding, t.sharding)
  assert restored["params"]["w"].sharding.spec == P(None, "tensor")
  c.close()


def test_incompatible_target_names_the_problem(tmp_path):
  m = mesh((8, 1, 1, 1))
  state = make_state(m)
  c = Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False)
  c.save(1, state)
  bad = abstract(state, m, P())
  bad["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(m, P()))
  with pytest.raises(CheckpointError,
                     match=r"shape mismatch for params/w: checkpoint \(8, 8\) vs target \(8, 4\)"):
    c.restore(1, bad)
  extra = abstract(state, m, P())
  extra["params"]["new"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(m, P()))
  with pytest.raises(CheckpointError, match=r"missing arrays \['params/new'\]"):
    c.restore(1, extra)
  with pytest.raises(CheckpointError, match="no data iterator state"):
    c.restore(1, abstract(state, m, P()), iter(loader()))
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    Checkpointer(str(tmp_path / "empty"), save_interval_steps=1).restore(None, bad)
  c.close()


def _files_under(d):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


# A failed tensorstore read leaves orbax coroutines that complain when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["garble_array_data", "truncate_index"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
  """Orbax stores arrays zstd-compressed in OCDBT files: garbling an array's data
  file fails decompression, truncating a b-tree/index file fails the read. Both
  surface as CheckpointError naming the step folder and the bad file. (Tiny
  arrays are inlined in the index, hence the 64x64 random array here.)"""
  m = mesh((8, 1, 1, 1))
  state = make_state(m)
  state["params"]["big"] = jax.device_put(
      np.random.RandomState(0).randn(64, 64).astype(np.float32), NamedSharding(m, P()))
  c = Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False)
  c.save(1, state)
  sd = tmp_path / "1" / "state"
  if damage == "garble_array_data":
    targets = _files_under(sd / "ocdbt.process_0" / "d")
  else:
    targets = _files_under(sd / "d")
  assert targets
  for f in targets:
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
      if damage == "garble_array_data":
        fh.seek(size // 2)
        fh.write(b"\x5a" * (size - size // 2))
      else:
        fh.truncate(size // 2)
  with pytest.raises(CheckpointError) as e:
    c.restore(1, abstract(state, m, P()))
  msg = str(e.value)
  assert str(tmp_path / "1") in msg and "\n" not in msg
  if damage == "garble_array_data":  # Names the array and the failing decompression.
    assert "params.big" in msg and "ZSTD" in msg
  else:
    assert "byte range" in msg.lower()
  c.close()
  gc.collect()


def test_sigterm_sets_preemption(tmp_path):
  c = Checkpointer(str(tmp_path), save_interval_steps=1)
  ck._SIGTERM.clear()
  previous = ck.install_sigterm_handler()
  try:
    assert not c.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert c.reached_preemption(2)
  finally:
    signal.signal(signal.SIGTERM, previous)
    ck._SIGTERM.clear()
    c.close()
