"""Built-in dataset `bvl_shapes_multi`: 1 to 3 coloured shapes per image with their boxes.

The several-object variant of `bvl_shapes` (data/shapes.py: same shapes, colours, sizes,
backgrounds and drawing), for localisation targets (LocCa, SigLIP 2). Every example is a
pure function of (seed, split, index). Within an image no two objects share (colour, shape),
so the referring expression "the red circle" names exactly one box.

Per example: `image`, `caption` (the whole image, objects left to right), `num_objects`,
and per object slot (MAX_OBJECTS slots, the unused ones zero): `labels` (shape class),
`colors`, `sizes`, `boxes` ((ymin, xmin, ymax, xmax) in [0, 1], from the drawn pixels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

import tensorflow_datasets as tfds

from big_vision_lite.data import shapes

NAME = "bvl_shapes_multi"
MAX_OBJECTS = 3
_SPLIT_IDS = {"train": 0, "validation": 1}
# Large shapes (up to 0.68 of the side across) only ever come alone; with company the
# objects are small or medium so that three fit without overlapping.
_GROUP_SIZES = ("small", "medium")
_GAP = 2.0  # pixels between the circumscribed circles of two objects
_TRIES = 50  # placements tried per object before the image keeps fewer objects


def expression_for(shape: str, color: str) -> str:
  """The referring expression of an object: 'the red circle' (unique within its image)."""
  return f"the {color} {shape}"


def caption_for(objects: list[tuple[str, str, str]], background: str) -> str:
  """'a small red circle and a medium blue star on a grey background' for (shape, colour,
  size) objects listed left to right."""
  parts = [f"a {size} {color} {shape}" for shape, color, size in objects]
  return f"{' and '.join(parts)} on a {background} background"


def _backgrounds_for_all(colors: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(b for b in shapes.BACKGROUND_NAMES
               if all(b in shapes._BG_CHOICES[c] for c in colors))


def generate_example(split: str, index: int, *, seed: int = shapes.SEED,
                     image_size: int = shapes.IMAGE_SIZE) -> dict[str, Any]:
  """Draws example `index` of `split` (see the module doc for its keys)."""
  if split not in _SPLIT_IDS:
    raise ValueError(f"{NAME} has no split {split!r} (known: {', '.join(_SPLIT_IDS)})")
  # A stream of its own (the 1 tag), so no example repeats one of bvl_shapes.
  rng = np.random.default_rng([seed, 1, _SPLIT_IDS[split], index])
  background = shapes.BACKGROUND_NAMES[int(rng.integers(len(shapes.BACKGROUND_NAMES)))]
  colors_ok = [c for c in shapes.COLOR_NAMES if background in shapes._BG_CHOICES[c]]
  wanted = int(rng.integers(1, MAX_OBJECTS + 1))
  placed: list[dict[str, Any]] = []
  used: set[tuple[str, str]] = set()
  for _ in range(wanted):
    while True:  # a (colour, shape) pair not yet in the image: there are far more than 3
      color = colors_ok[int(rng.integers(len(colors_ok)))]
      shape = shapes.CLASS_NAMES[int(rng.integers(len(shapes.CLASS_NAMES)))]
      if (color, shape) not in used:
        break
    sizes = shapes.SIZE_NAMES if wanted == 1 else _GROUP_SIZES
    size = sizes[int(rng.integers(len(sizes)))]
    lo, hi = shapes.SIZES[size]
    r = rng.uniform(lo, hi) * image_size
    rot = rng.uniform(-10, 10)
    for _ in range(_TRIES):
      cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
      if all(np.hypot(cx - o["cx"], cy - o["cy"]) >= r + o["r"] + _GAP for o in placed):
        break
    else:
      continue  # no room left: this image keeps the objects placed so far
    used.add((color, shape))
    placed.append(dict(shape=shape, color=color, size=size, r=r, cx=cx, cy=cy, rot=rot))
  placed.sort(key=lambda o: o["cx"])  # caption and slots read left to right

  img = Image.new("RGB", (image_size, image_size), shapes.BACKGROUNDS[background])
  draw = ImageDraw.Draw(img)
  boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
  for k, o in enumerate(placed):
    # The box is that of the pixels the shape covers, drawn alone on a mask.
    mask = Image.new("L", (image_size, image_size), 0)
    shapes._draw_shape(ImageDraw.Draw(mask), o["shape"], o["cx"], o["cy"], o["r"], o["rot"], 255)
    ys, xs = np.nonzero(np.asarray(mask))
    boxes[k] = (ys.min() / image_size, xs.min() / image_size,
                (ys.max() + 1) / image_size, (xs.max() + 1) / image_size)
    shapes._draw_shape(draw, o["shape"], o["cx"], o["cy"], o["r"], o["rot"],
                       shapes.COLORS[o["color"]])
  noise = rng.integers(-shapes._NOISE, shapes._NOISE + 1, size=(image_size, image_size, 1),
                       dtype=np.int16)
  arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)

  def slots(values: list[int]) -> np.ndarray:
    return np.array(values + [0] * (MAX_OBJECTS - len(values)), np.int64)

  return {
      "image": arr,
      "caption": caption_for([(o["shape"], o["color"], o["size"]) for o in placed], background),
      "background": shapes.BACKGROUND_NAMES.index(background),
      "num_objects": len(placed),
      "labels": slots([shapes.CLASS_NAMES.index(o["shape"]) for o in placed]),
      "colors": slots([shapes.COLOR_NAMES.index(o["color"]) for o in placed]),
      "sizes": slots([shapes.SIZE_NAMES.index(o["size"]) for o in placed]),
      "boxes": boxes,
  }


@dataclasses.dataclass
class BvlShapesMultiConfig(tfds.core.BuilderConfig):
  num_train: int = shapes.NUM_TRAIN
  num_validation: int = shapes.NUM_VALIDATION
  image_size: int = shapes.IMAGE_SIZE
  seed: int = shapes.SEED


class BvlShapesMulti(tfds.core.GeneratorBasedBuilder):
  """One to three coloured shapes on a plain background, with boxes, captions and labels."""

  # Bump when generation changes: caches are reused by version.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      BvlShapesMultiConfig(name="default", description="20k train / 2k validation, 64x64."),
      BvlShapesMultiConfig(name="tiny", description="Few examples, for tests.",
                           num_train=shapes.NUM_TRAIN_TINY,
                           num_validation=shapes.NUM_VALIDATION_TINY),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  url_infos = None  # nothing is downloaded (see shapes.BvlShapes)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    slots = lambda dtype: tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=dtype)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "background": tfds.features.ClassLabel(names=list(shapes.BACKGROUND_NAMES)),
            "num_objects": tfds.features.Scalar(dtype=np.int64),
            "labels": slots(np.int64),
            "colors": slots(np.int64),
            "sizes": slots(np.int64),
            "boxes": tfds.features.Tensor(shape=(MAX_OBJECTS, 4), dtype=np.float32),
        }),
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
      ex["image"] = shapes.encode_png(ex["image"])
      yield i, ex


def ensure_built(data_dir: str | None = None, config: str = "default") -> str:
  """Builds `bvl_shapes_multi/<config>` into `data_dir` unless there (shapes.ensure_built)."""
  return shapes.ensure_built(data_dir, config, builder_cls=BvlShapesMulti)
