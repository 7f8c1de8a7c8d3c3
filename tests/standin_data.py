"""Stand-in data for the recipe runs, made in the test: a tfds-format dataset under a chosen name
(e.g. imagenet2012's layout), web-style tar shards of image/caption pairs, a sentencepiece model."""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Sequence

import numpy as np
from PIL import Image

WORDS = ("a photo of a red green blue circle square triangle on the left right top bottom of "
         "small large image with one two dog cat car house tree").split()


def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def write_tfds(data_dir: str, name: str, splits: dict[str, int], num_classes: int,
               version: str = "1.0.0") -> None:
  """A tfds dataset `name`/`version` in ArrayRecord files with image (JPEG), label and file_name,
  as tfds writes imagenet2012 (whose registered builder then reads it from data_dir)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered

  with registered.skip_registration():
    class StandIn(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version(version)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
            "file_name": tfds.features.Text()}), supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in splits.items()}

      def _generate_examples(self, split, n):
        rng = np.random.default_rng(len(split))
        for i in range(n):
          # Non-square, of varied sizes, like photos: the crops and resizes must handle them.
          yield f"{split}{i}", {"image": jpeg(rng, 40 + i % 9, 48 + i % 5),
                                "label": int(rng.integers(num_classes)), "file_name": f"{split}_{i}.JPEG"}
    StandIn.name = name
  builder = StandIn(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def caption(rng: np.random.Generator) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))


def regions_json(rng: np.random.Generator) -> bytes:
  """KEY.json with 1 to 3 regions (a few words, a box in [0, 1]), as ops_locca.json_regions reads."""
  regions = []
  for _ in range(int(rng.integers(1, 4))):
    y0, x0 = rng.uniform(0, 0.5, 2)
    y1, x1 = y0 + rng.uniform(0.1, 0.5), x0 + rng.uniform(0.1, 0.5)
    regions.append({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))),
                    "box": [round(float(v), 4) for v in (y0, x0, y1, x1)]})
  return json.dumps({"regions": regions}).encode()


def write_tar_shards(directory: str, num_shards: int, per_shard: int, seed: int = 0) -> str:
  """img2dataset-style shards (KEY.jpg + KEY.txt, and KEY.json with regions) in `directory`;
  returns their glob pattern. The regions come from their own rng: images and captions are
  those of the same seed without them."""
  rng = np.random.default_rng(seed)
  region_rng = np.random.default_rng([seed, 1])
  os.makedirs(directory, exist_ok=True)
  for s in range(num_shards):
    with tarfile.open(os.path.join(directory, f"{s:05d}.tar"), "w") as tar:
      for i in range(per_shard):
        key = f"{s:05d}{i:04d}"
        for ext, data in (("jpg", jpeg(rng, 40 + i % 7, 56)), ("txt", caption(rng).encode()),
                          ("json", regions_json(region_rng))):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(directory, "*.tar")


def train_sentencepiece(path: str, vocab_size: int = 40, seed: int = 0) -> str:
  """A small sentencepiece model trained on stand-in captions, written to `path` (.model)."""
  import sentencepiece as spm
  rng = np.random.default_rng(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([caption(rng) for _ in range(500)]), model_writer=model,
      vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
      minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def write_class_folder(directory: str, classes: Sequence[str], per_class: int, seed: int = 0) -> str:
  """An image folder with one sub-folder of PNG files per class (what users bring)."""
  rng = np.random.default_rng(seed)
  for c in classes:
    os.makedirs(os.path.join(directory, c), exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)).save(
          os.path.join(directory, c, f"{i:03d}.png"))
  return directory
