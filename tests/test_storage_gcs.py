"""storage's folder operations on gs:// against the local GCS emulator: a folder is exactly `dir/`,
never the siblings that share its name as a prefix (`dir2/`, `dir.txt`)."""

import os

import pytest

import gcs_emulator  # noqa: E402  (before gcsfs is imported)

pytest.importorskip("gcsfs", reason="the [test] extra installs gcsfs")
pytest.importorskip("gcp_storage_emulator.server", reason="the [test] extra installs it")

from big_vision_lite import storage  # noqa: E402

BUCKET = gcs_emulator.BUCKET
gcs = gcs_emulator.fixture(BUCKET)
FILES = ["a/b/x.txt", "a/b/sub/y.txt", "a/bc/z.txt", "a/b.txt", "a/b2/sub/w.txt"]


def _tree(root):
  """Every object below `root/` (listed by gcsfs itself, not by the code under test)."""
  import gcsfs
  base = root.split("://", 1)[1]
  return sorted(p[len(base) + 1:] for p in gcsfs.GCSFileSystem().find(base))


def _write(root, names):
  for n in names:
    with storage.open_file(f"{root}/{n}", "w") as f:
      f.write(n)


def test_rename_moves_the_folder_and_nothing_that_shares_its_prefix(gcs):
  root = f"gs://{BUCKET}/rename"
  _write(root, FILES)
  storage.rename(f"{root}/a/b", f"{root}/a/moved")
  assert _tree(root) == sorted(["a/moved/x.txt", "a/moved/sub/y.txt", "a/bc/z.txt", "a/b.txt",
                                "a/b2/sub/w.txt"])
  assert storage.read_text(f"{root}/a/moved/sub/y.txt") == "a/b/sub/y.txt"
  assert storage.read_text(f"{root}/a/bc/z.txt") == "a/bc/z.txt"
  assert not storage.exists(f"{root}/a/b")
  # A name that is only a prefix of other objects is no folder: nothing to move.
  with pytest.raises(FileNotFoundError):
    storage.rename(f"{root}/a/b", f"{root}/a/c")
  assert "a/bc/z.txt" in _tree(root)
  # A single object.
  storage.rename(f"{root}/a/b.txt", f"{root}/a/c.txt")
  assert storage.read_text(f"{root}/a/c.txt") == "a/b.txt" and not storage.exists(f"{root}/a/b.txt")


def test_local_copy_of_a_folder_holds_exactly_its_objects(gcs, tmp_path):
  root = f"gs://{BUCKET}/fetch"
  _write(root, FILES)
  with storage.local_copy(f"{root}/a/b") as local:
    got = sorted(os.path.relpath(os.path.join(r, n), local) for r, _, ns in os.walk(local) for n in ns)
    assert got == ["sub/y.txt", "x.txt"]
    with open(os.path.join(local, "sub", "y.txt")) as f:
      assert f.read() == "a/b/sub/y.txt"
  assert not os.path.exists(local)


def test_workdir_overwrite_on_gcs_moves_the_previous_run_aside(gcs):
  """--overwrite's move (train.check_workdir) of a gs:// workdir: its files, not a sibling run's."""
  import ml_collections
  from big_vision_lite import train
  run, sibling = f"gs://{BUCKET}/runs/r", f"gs://{BUCKET}/runs/r2"
  _write(run, ["config.json", "metrics.jsonl", "checkpoints/2/x", "tb/events"])
  _write(sibling, ["config.json", "checkpoints/2/x"])
  train.check_workdir(ml_collections.ConfigDict({"allow_config_change": False}), run, overwrite=True)
  backups = [n for n in storage.listdir(run) if n.startswith("overwritten-")]
  assert len(backups) == 1
  assert _tree(f"{run}/{backups[0]}") == ["checkpoints/2/x", "config.json", "metrics.jsonl", "tb/events"]
  assert sorted(storage.listdir(run)) == sorted(backups + ["config.json"])
  assert _tree(sibling) == ["checkpoints/2/x", "config.json"]
