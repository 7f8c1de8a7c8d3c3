"""The trainer reads bvl-make-dataset's dataset_info.json; contiguous slices of unshuffled records warn."""

import io
import logging
import os
import tarfile

import ml_collections
import pytest

from big_vision_lite import build, config as config_lib
from big_vision_lite.data import sources
from big_vision_lite.evaluators import zero_shot
from big_vision_lite.tools import make_dataset
from test_make_dataset import ROOT, class_folder, data, png


def test_trainer_reads_split_size_from_the_summary_without_the_records(tmp_path, monkeypatch):
  make_dataset.make_dataset(str(class_folder(tmp_path / "images")), str(tmp_path / "ds"), log=io.StringIO())
  files = tmp_path / "ds" / "train-*.array_record"
  read = len(sources.get_source(data(files, "train[:50%]")))  # by opening the shards
  monkeypatch.setattr(sources, "ArrayRecordSource", None)  # any record read would now fail
  assert sources.num_examples(data(files)) == 27
  assert sources.num_examples(data(files, "train[:50%]")) == read == 14  # tfds rounds 13.5 up
  config = config_lib.load_config(os.path.join(ROOT, f"configs/own_folder.py:data={tmp_path / 'ds'},epochs=5"))
  config.input.batch_size = 4
  assert config.model.num_classes == 3
  assert build.total_steps_of(config) == 34  # ceil(5 * 27 / 4)
  assert zero_shot._builtin_class_names(config.evals.val.data) == ("cat", "dog", "emu")


def test_config_without_a_dataset_is_one_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no dataset_info.json in"):
    config_lib.load_config(os.path.join(ROOT, f"configs/own_folder.py:data={tmp_path}"))


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_contiguous_slice_of_unshuffled_records_warns_once(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(sources, "_warned", set())
  sorted_records = [{"image": png(0), "label": i // 10} for i in range(30)]  # class-sorted, no summary
  sources.write_array_record(str(tmp_path / "raw.array_record"), sorted_records)
  with caplog.at_level(logging.WARNING, logger="big_vision_lite"):
    for _ in range(2):
      assert len(sources.get_source(data(tmp_path / "raw.array_record", "train[80%:]"))) == 6
    sources.get_source(data(tmp_path / "raw.array_record", "train"))  # no slice, no warning
  (line,) = _warnings(caplog)
  assert "'train[80%:]'" in line and "not known to be shuffled" in line and "only the last classes" in line


def test_shuffled_summary_silences_the_warning_unless_labels_look_sorted(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(sources, "_warned", set())
  make_dataset.make_dataset(str(class_folder(tmp_path / "images")), str(tmp_path / "ds"), log=io.StringIO())
  with caplog.at_level(logging.WARNING, logger="big_vision_lite"):
    sources.get_source(data(tmp_path / "ds" / "train-*.array_record", "train[:80%]"))
  assert not _warnings(caplog)
  # A summary that says shuffled next to records sorted by label: the records win.
  name = "train-00000-of-00001.array_record"
  sources.write_array_record(str(tmp_path / "ds" / name), [{"image": png(0), "label": i // 9} for i in range(27)])
  with caplog.at_level(logging.WARNING, logger="big_vision_lite"):
    sources.get_source(data(tmp_path / "ds" / name, "train[:80%]"))
  (line,) = _warnings(caplog)
  assert "sorted by label" in line


def test_contiguous_slice_of_tar_shards_warns(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(sources, "_warned", set())
  with tarfile.open(tmp_path / "s.tar", "w") as tar:
    for i in range(4):
      for ext, payload in (("png", png(i)), ("txt", b"x")):
        member = tarfile.TarInfo(f"{i}.{ext}")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
  with caplog.at_level(logging.WARNING, logger="big_vision_lite"):
    sources.get_source(ml_collections.ConfigDict(dict(name="tar", files=str(tmp_path / "s.tar"),
                                                      split="train[:50%]")))
  (line,) = _warnings(caplog)
  assert "only the last classes" in line
