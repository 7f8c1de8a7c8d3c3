"""Built-in dataset `bvl_shapes`: coloured geometric shapes drawn on the machine.

Every example is a pure function of (seed, split, index), so the dataset is
reproducible anywhere and the main command runs without downloading anything.
It is a tfds `GeneratorBasedBuilder` writing ArrayRecord files; `ensure_built`
builds it once into a cache folder, safely when several processes ask at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import math
import os
import shutil
import time
from typing import Any, Iterator

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

import tensorflow_datasets as tfds

from big_vision_lite import storage

NAME = "bvl_shapes"
IMAGE_SIZE = 64
NUM_TRAIN = 20_000
NUM_VALIDATION = 2_000
SEED = 0
# Tiny variant for tests; the default config (full size) is what training uses.
NUM_TRAIN_TINY = 512
NUM_VALIDATION_TINY = 128

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
    "beige": (225, 210, 170),
    "dark blue": (20, 30, 90),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# Radius as a fraction of the image side; ranges do not overlap so the size
# label stays meaningful.
SIZES = {"small": (0.12, 0.15), "medium": (0.20, 0.24), "large": (0.29, 0.34)}
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
_SPLIT_IDS = {"train": 0, "validation": 1}
_MIN_CONTRAST = 110.0  # RGB distance: keeps e.g. white on beige or blue on dark blue out.
_NOISE = 4  # Pixel noise is uniform in [-_NOISE, _NOISE].


def _contrasting_backgrounds(color: str) -> tuple[str, ...]:
  c = np.array(COLORS[color], float)
  return tuple(b for b, v in BACKGROUNDS.items()
               if np.linalg.norm(c - np.array(v, float)) >= _MIN_CONTRAST)


_BG_CHOICES = {c: _contrasting_backgrounds(c) for c in COLOR_NAMES}


def caption_for(shape: str, color: str, size: str, background: str, position: str) -> str:
  """'a small red triangle on a grey background in the top left'."""
  return f"a {size} {color} {shape} on a {background} background {position}"


def _position_name(cx: float, cy: float, image_size: int) -> str:
  col = min(int(3 * cx / image_size), 2)
  row = min(int(3 * cy / image_size), 2)
  return POSITION_NAMES[3 * row + col]


def _regular_polygon(cx, cy, r, n, rot_deg):
  a0 = math.radians(rot_deg)
  return [(cx + r * math.cos(a0 + 2 * math.pi * k / n), cy + r * math.sin(a0 + 2 * math.pi * k / n))
          for k in range(n)]


def _star(cx, cy, r, rot_deg):
  a0 = math.radians(rot_deg - 90)
  pts = []
  for k in range(10):
    rk = r if k % 2 == 0 else 0.45 * r
    a = a0 + math.pi * k / 5
    pts.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
  return pts


def _cross(cx, cy, r, rot_deg):
  w = 0.36 * r
  base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
          (-r, w), (-r, -w), (-w, -w)]
  a = math.radians(rot_deg)
  ca, sa = math.cos(a), math.sin(a)
  return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill) -> None:
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "ring":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.35 * r)))
  elif shape == "square":
    # A square's corners sit at 45 degrees; the small jitter keeps it far from a diamond.
    draw.polygon(_regular_polygon(cx, cy, r, 4, 45 + rot), fill=fill)
  elif shape == "diamond":
    # A tall rhombus, not a rotated square, so it never looks like one.
    draw.polygon([(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)], fill=fill)
  elif shape == "triangle":
    draw.polygon(_regular_polygon(cx, cy, r, 3, -90 + rot), fill=fill)
  elif shape == "hexagon":
    draw.polygon(_regular_polygon(cx, cy, r, 6, rot), fill=fill)
  elif shape == "star":
    draw.polygon(_star(cx, cy, r, rot), fill=fill)
  elif shape == "cross":
    draw.polygon(_cross(cx, cy, r, rot), fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(CLASS_NAMES)})")


def generate_example(split: str, index: int, *, seed: int = SEED,
                     image_size: int = IMAGE_SIZE) -> dict[str, Any]:
  """Draws example `index` of `split`: image (HxWx3 uint8) plus its labels and caption."""
  if split not in _SPLIT_IDS:
    raise ValueError(f"bvl_shapes has no split {split!r} (known: {', '.join(_SPLIT_IDS)})")
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  label = int(rng.integers(len(CLASS_NAMES)))
  color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
  bgs = _BG_CHOICES[color]
  background = bgs[int(rng.integers(len(bgs)))]
  size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
  lo, hi = SIZES[size]
  r = rng.uniform(lo, hi) * image_size
  cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
  rot = rng.uniform(-10, 10)
  shape = CLASS_NAMES[label]

  img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
  _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, rot, COLORS[color])
  # The box of the pixels the shape covers, as bvl_shapes_multi's boxes (drawn alone on a mask).
  mask = Image.new("L", (image_size, image_size), 0)
  _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, rot, 255)
  ys, xs = np.nonzero(np.asarray(mask))
  box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32) / image_size
  # Integer noise shared by the 3 channels: cheap to draw and PNG stays small.
  noise = rng.integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 1), dtype=np.int16)
  arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
  position = _position_name(cx, cy, image_size)
  return {
      "image": arr,
      "label": label,
      "color": COLOR_NAMES.index(color),
      "size": SIZE_NAMES.index(size),
      "background": BACKGROUND_NAMES.index(background),
      "position": POSITION_NAMES.index(position),
      "caption": caption_for(shape, color, size, background, position),
      "box": box,
  }


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Low compression: the noise makes higher levels slow for little gain.
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


@dataclasses.dataclass
class BvlShapesConfig(tfds.core.BuilderConfig):
  num_train: int = NUM_TRAIN
  num_validation: int = NUM_VALIDATION
  image_size: int = IMAGE_SIZE
  seed: int = SEED


class BvlShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on plain backgrounds, with labels and captions."""

  # Bump when generation changes: caches are reused by version.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "The shape's box (ymin, xmin, ymax, xmax in [0, 1]); images unchanged."}
  BUILDER_CONFIGS = [
      BvlShapesConfig(name="default", description="20k train / 2k validation, 64x64."),
      BvlShapesConfig(name="tiny", description="Few examples, for tests.",
                      num_train=NUM_TRAIN_TINY, num_validation=NUM_VALIDATION_TINY),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  # Nothing is downloaded, so no checksums file; tfds' lookup of one would
  # import `importlib_resources`, which this environment lacks.
  url_infos = None

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "color": tfds.features.ClassLabel(names=list(COLOR_NAMES)),
            "size": tfds.features.ClassLabel(names=list(SIZE_NAMES)),
            "background": tfds.features.ClassLabel(names=list(BACKGROUND_NAMES)),
            "position": tfds.features.ClassLabel(names=list(POSITION_NAMES)),
            "caption": tfds.features.Text(),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/google-research/big_vision",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: everything is drawn here.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    for i in range(n):
      ex = generate_example(split, i, seed=cfg.seed, image_size=cfg.image_size)
      # Without TensorFlow, tfds can only store images given as encoded bytes.
      ex["image"] = encode_png(ex["image"])
      yield i, ex


def default_data_dir() -> str:
  return os.environ.get("BVL_DATA_DIR") or os.path.expanduser("~/.cache/big_vision_lite/tfds")


def ensure_built(data_dir: str | None = None, config: str = "default",
                 builder_cls: type[tfds.core.DatasetBuilder] | None = None) -> str:
  """Builds `bvl_shapes/<config>` into `data_dir` unless already there; returns data_dir.

  `builder_cls` builds another built-in dataset the same way (shapes_multi.BvlShapesMulti).

  tfds writes into a temporary folder and renames it when complete, so a build
  cut off halfway is never taken as the dataset. A file lock makes concurrent
  callers (several processes or tests) wait for one builder.
  """
  builder_cls = builder_cls or BvlShapes
  name = builder_cls.name
  if data_dir and storage.is_remote(data_dir):  # read there, never built there
    if builder_cls(config=config, data_dir=data_dir).is_prepared():
      return data_dir
    raise FileNotFoundError(f"{name}/{config} is not prepared in {data_dir}: build it into a local data_dir "
                            f"and copy that folder there (docs/storage.md)")
  data_dir = os.path.abspath(data_dir or default_data_dir())
  builder = builder_cls(config=config, data_dir=data_dir)
  if builder.is_prepared():
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  # One lock for all configs: tfds also writes files shared between them.
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = builder_cls(config=config, data_dir=data_dir)
      if builder.is_prepared():  # Someone else built it while we waited.
        return data_dir
      _remove_incomplete(builder)
      t0 = time.time()
      logging.info("Building %s/%s into %s", name, config, data_dir)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      logging.info("Built %s/%s in %.1fs", name, config, time.time() - t0)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return data_dir


def _remove_incomplete(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes what a killed or foreign build left (we hold the lock, so nobody is writing).

  That is tfds' temporary folders, and a version folder that is not a valid
  dataset: tfds could not rename its finished build over a non-empty one.
  """
  version_dir = os.fspath(builder.data_path)
  parent = os.path.dirname(version_dir)
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if "incomplete" in name:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  if os.path.isdir(version_dir):
    logging.warning("Removing %s: it is not a complete %s build", version_dir, builder.name)
    shutil.rmtree(version_dir)
