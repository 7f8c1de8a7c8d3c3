"""bvl-make-dataset: folder / CSV / JSONL / tar inputs to shuffled ArrayRecord splits with a summary."""

import glob
import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from big_vision_lite.data import dataset_info, sources
from big_vision_lite.tools import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def class_folder(root, classes=("cat", "dog", "emu"), per_class=10):
  for c, name in enumerate(classes):
    os.makedirs(root / name)
    for i in range(per_class):
      (root / name / f"{i:02d}.png").write_bytes(png(20 * c + i))
  return root


def records(out, split):
  return list(sources.ArrayRecordSource(sorted(glob.glob(str(out / f"{split}-*.array_record")))))


def data(files, split=None):
  return ml_collections.ConfigDict(dict(name="array_record", files=str(files), split=split))


def test_folder_becomes_shuffled_stratified_splits_with_a_summary(tmp_path, capsys):
  src = class_folder(tmp_path / "images")
  assert make_dataset.main([str(src), str(tmp_path / "ds"), "--val-fraction", "0.2", "--shard-size", "7"]) == 0
  assert "train: 24 examples, 3 classes in 4 shard(s)" in capsys.readouterr().out
  info = json.loads((tmp_path / "ds" / "dataset_info.json").read_text())
  assert info["class_names"] == ["cat", "dog", "emu"] and info["num_classes"] == 3 and info["shuffled"]
  assert info["splits"]["train"]["num_examples"] == 24
  assert info["splits"]["validation"]["examples_per_class"] == [2, 2, 2]  # 20% of each class
  assert info["splits"]["train"]["files"][0] == "train-00000-of-00004.array_record"
  train_recs, val_recs = records(tmp_path / "ds", "train"), records(tmp_path / "ds", "validation")
  assert set(train_recs[0]) == {"image", "label"}
  images = [bytes(r["image"]) for r in train_recs + val_recs]
  assert len(set(images)) == 30  # every input image exactly once
  labels = [int(r["label"]) for r in train_recs]
  assert labels != sorted(labels)  # shuffled, not class-sorted
  assert bytes(train_recs[0]["image"]) in {(src / c / f).read_bytes() for c in ("cat", "dog", "emu")
                                           for f in os.listdir(src / c)}  # stored as in the file


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
  src = class_folder(tmp_path / "images")
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    make_dataset.make_dataset(str(src), str(tmp_path / name), seed=seed, log=io.StringIO())
  read = lambda d: [(tmp_path / d / f).read_bytes() for f in sorted(os.listdir(tmp_path / d))]
  assert read("a") == read("b")
  assert read("a") != read("c")


def test_unreadable_image_is_one_line_naming_it(tmp_path, capsys):
  src = class_folder(tmp_path / "images")
  (src / "dog" / "broken.png").write_bytes(png(1)[:30])  # truncated
  assert make_dataset.main([str(src), str(tmp_path / "ds")]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(src / "dog" / "broken.png") in err[0] and "cannot decode" in err[0], err
  info = dataset_info.read(str(tmp_path / "ds"))
  assert sum(s["num_examples"] for s in info["splits"].values()) == 30
  assert len(info["skipped"]) == 1


@pytest.mark.parametrize("make_input", ["missing_folder", "missing_csv", "no_class_folders", "csv_without_rows"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_input):
  path = tmp_path / ("list.csv" if "csv" in make_input else "images")
  if make_input == "csv_without_rows":
    path.write_text("image,caption\n")
  if make_input == "no_class_folders":
    path.mkdir()
    (path / "a.png").write_bytes(png(0))
  assert make_dataset.main([str(path), str(tmp_path / "ds")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
  assert not (tmp_path / "ds").exists()


def test_existing_dataset_is_kept_without_overwrite(tmp_path, capsys):
  src = class_folder(tmp_path / "images")
  assert make_dataset.main([str(src), str(tmp_path / "ds")]) == 0
  assert make_dataset.main([str(src), str(tmp_path / "ds"), "--val-fraction", "0.5"]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert make_dataset.main([str(src), str(tmp_path / "ds"), "--val-fraction", "0.5", "--overwrite"]) == 0
  assert dataset_info.read(str(tmp_path / "ds"))["splits"]["validation"]["num_examples"] == 15


def test_csv_captions_and_bad_lines(tmp_path, capsys):
  (tmp_path / "img").mkdir()
  for i in range(6):
    (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
  rows = ["image,caption"] + [f"img/{i}.png,a photo of number {i}" for i in range(6)]
  rows += [",no image here", "img/missing.png,gone"]
  (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
  assert make_dataset.main([str(tmp_path / "list.csv"), str(tmp_path / "ds"), "--val-fraction", "0.34"]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2, err
  assert f"{tmp_path / 'list.csv'}:8: no 'image'" in err[0]
  assert "missing.png" in err[1] and "list.csv:9" in err[1] and "cannot read" in err[1]
  recs = records(tmp_path / "ds", "train") + records(tmp_path / "ds", "validation")
  assert sorted(r["caption"] for r in recs) == [f"a photo of number {i}" for i in range(6)]
  info = dataset_info.read(str(tmp_path / "ds"))
  assert info["splits"]["validation"]["num_examples"] == len(records(tmp_path / "ds", "validation")) >= 1
  assert "label" not in recs[0] and info["num_classes"] is None and set(info["keys"]) == {"image", "caption"}


def test_jsonl_with_label_names_and_a_malformed_line(tmp_path, capsys):
  lines = []
  for i in range(8):
    (tmp_path / f"{i}.png").write_bytes(png(i))
    lines.append(json.dumps({"image": f"{i}.png", "caption": f"c{i}", "label": ["zebra", "ant"][i % 2]}))
  lines.insert(3, "{not json")
  (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
  assert make_dataset.main([str(tmp_path / "list.jsonl"), str(tmp_path / "ds"), "--val-fraction", "0.25"]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "list.jsonl:4: not a JSON object" in err[0], err
  info = dataset_info.read(str(tmp_path / "ds"))
  assert info["class_names"] == ["ant", "zebra"] and info["splits"]["validation"]["examples_per_class"] == [1, 1]
  recs = records(tmp_path / "ds", "train")
  assert all(r["label"] == (0 if int(r["caption"][1:]) % 2 else 1) for r in recs)


def test_tar_shards_keep_their_captions(tmp_path):
  with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
    for i in range(5):
      for ext, payload in (("jpg", png(i)), ("txt", f"caption {i}".encode())):
        member = tarfile.TarInfo(f"{i:04d}.{ext}")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
  info = make_dataset.make_dataset(str(tmp_path / "*.tar"), str(tmp_path / "ds"), val_fraction=0.2,
                                   log=io.StringIO())
  assert info["input_kind"] == "tar" and info["splits"]["validation"]["num_examples"] == 1
  recs = records(tmp_path / "ds", "train") + records(tmp_path / "ds", "validation")
  assert sorted(r["caption"] for r in recs) == [f"caption {i}" for i in range(5)]


def test_console_script_points_at_main():
  import importlib
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    target = tomllib.load(f)["project"]["scripts"]["bvl-make-dataset"]
  module, _, name = target.partition(":")
  assert getattr(importlib.import_module(module), name) is make_dataset.main


@pytest.mark.slow
@pytest.mark.extended  # the own_folder recipe's README figure; CI trains it small (test_recipes_run)
def test_real_digits_train_to_95_percent_held_out(tmp_path):
  """docs/data.md "Your own images": scikit-learn's 8x8 digits as PNG folders -> the tool -> the trainer CLI."""
  import subprocess
  import sys
  digits = pytest.importorskip("sklearn.datasets").load_digits()
  for i, (img, y) in enumerate(zip(digits.images, digits.target)):
    os.makedirs(tmp_path / "digits" / str(y), exist_ok=True)
    Image.fromarray((img * 255 / 16).astype(np.uint8)).save(tmp_path / "digits" / str(y) / f"{i:04d}.png")
  assert make_dataset.main([str(tmp_path / "digits"), str(tmp_path / "ds")]) == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "big_vision_lite.train", "--config",
                      f"configs/own_folder.py:data={tmp_path / 'ds'}", "--workdir", str(tmp_path / "run"),
                      "--config.progress=False"], env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["val/examples"] == 179 and result["val/prec@1"] >= 0.95, result
