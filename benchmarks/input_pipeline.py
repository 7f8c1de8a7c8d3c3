"""Input-pipeline throughput: ours (grain + Pillow ops) vs big_vision's tf.data graph and torchvision.

  python benchmarks/input_pipeline.py             # full size: 500x375 JPEGs, batch 128
  python benchmarks/input_pipeline.py --toy       # seconds: what tests/test_benchmarks.py runs

ImageNet train preprocessing on ArrayRecord shards of photo-like JPEGs (smooth multi-scale noise
plus grain, quality 90, generated deterministically): JPEG decode, inception crop (5-100% area,
aspect 3/4..4/3), resize to 224, random flip, value range to [-1, 1] float32; batched. Each side
gets the same CPU cores (1, 2, all; the process and its workers pinned to them with
sched_setaffinity), and prints images/s in total and per core:
- ours: pipeline.make_train_iterator with `decode|inception_crop(224)|flip_lr|value_range(-1, 1)`
  and num_workers = cores (grain worker processes, batches in shared memory);
- tf.data: what big_vision's pp ops build (decode_jpeg_and_inception_crop via
  tf.image.sample_distorted_bounding_box + decode_and_crop_jpeg, resize, flip_lr, value_range),
  map(num_parallel_calls=cores) over the JPEG bytes held in memory, in a private thread pool of
  `cores` threads; skipped when tensorflow is not importable (pip install -e ".[bench]");
- torchvision: RandomResizedCrop(224, scale=(0.05, 1)), RandomHorizontalFlip, ToTensor,
  Normalize(0.5, 0.5) in a DataLoader with num_workers = cores over the same shards.
Also ours on the SigLIP image-text preprocessing (decode, resize 224, value range, tokenize).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_setup  # noqa: E402

OURS_TRAIN = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|keep('image', 'label')"
OURS_SIGLIP = ("decode|resize(224)|value_range(-1, 1)|tokenize(16, key='caption')"
               "|keep('image', 'labels')")
WORDS = ("red green blue small large circle square triangle left right top bottom a the of on").split()


def photo_jpeg(rng: np.random.Generator, h: int = 375, w: int = 500, quality: int = 90,
               mode: str = "RGB") -> bytes:
  """A photo-like JPEG: smooth noise at 7 scales (1/f-like spectrum) plus fine grain (also the
  test images of tests/test_data_ops.py)."""
  img = np.zeros((h, w, 3), np.float32)
  for octave in range(1, 8):
    small = rng.standard_normal((2 ** octave + 1, 2 ** octave + 1, 3)).astype(np.float32)
    img += np.stack([np.asarray(Image.fromarray(small[..., c].copy()).resize((w, h), Image.BICUBIC))
                     for c in range(3)], -1) * 0.75 ** octave
  img = (img - img.mean()) / img.std() * 45 + 120 + rng.standard_normal((h, w, 1)) * 5
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode).save(buf, "JPEG",
                                                                           quality=quality)
  return buf.getvalue()


def write_shards(directory: str, n: int, shards: int, hw: tuple[int, int]) -> tuple[str, list[bytes]]:
  from big_vision_lite.data import sources
  rng = np.random.default_rng(0)
  examples = [{"image": photo_jpeg(rng, *hw), "label": i % 1000,
               "caption": " ".join(rng.choice(WORDS, 8))} for i in range(n)]
  for s in range(shards):
    sources.write_array_record(os.path.join(directory, f"train-{s:05d}.array_record"), examples[s::shards])
  return os.path.join(directory, "train-*.array_record"), [e["image"] for e in examples]


class _Pinned:
  """Runs a measurement on the first `cores` CPUs only: this process, the threads it starts
  (tf.data's pool) and the worker processes it spawns (grain, DataLoader) inherit the affinity,
  so each side gets the cores its row names and no more."""

  def __init__(self, cores: int):
    self.cores = cores

  def __enter__(self):
    self.saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(self.saved)[:self.cores])

  def __exit__(self, *exc):
    os.sched_setaffinity(0, self.saved)


def _rate(batches, batch: int, n_batches: int) -> float:
  """Images/s over n_batches after one warm-up batch (workers started, caches filled)."""
  next(batches)
  start = time.perf_counter()
  for _ in range(n_batches):
    next(batches)
  return n_batches * batch / (time.perf_counter() - start)


def ours(files: str, spec: str, cores: int, batch: int, n_batches: int) -> float:
  import ml_collections
  from big_vision_lite.data import pipeline
  cfg = ml_collections.ConfigDict({"name": "array_record", "files": files, "split": "train"})
  it = pipeline.make_train_iterator(cfg, spec, global_batch_size=batch, seed=0, num_workers=cores,
                                    process_index=0, process_count=1)
  try:
    return _rate(it, batch, n_batches)
  finally:
    pipeline.close_iterator(it)


def tf_data(jpegs: list[bytes], cores: int, batch: int, n_batches: int) -> float | None:
  try:
    import tensorflow as tf
  except ImportError:
    return None
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)

  def pp(data, label):  # big_vision's decode_jpeg_and_inception_crop|resize|flip_lr|value_range
    shape = tf.image.extract_jpeg_shape(data)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), area_range=(0.05, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.cast(tf.image.resize(image, (224, 224), method="bilinear"), tf.uint8)
    image = tf.image.random_flip_left_right(image)
    image = tf.cast(image, tf.float32) / 255.0 * 2.0 - 1.0
    return {"image": image, "label": label}

  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  ds = (tf.data.Dataset.from_tensor_slices((jpegs, np.arange(len(jpegs)) % 1000))
        .shuffle(len(jpegs), seed=0).repeat().map(pp, num_parallel_calls=cores)
        .batch(batch, drop_remainder=True).prefetch(2).with_options(options))
  return _rate(iter(ds.as_numpy_iterator()), batch, n_batches)


def _import_torchvision_transforms():
  """torchvision.transforms, through the converters' torch import (a CUDA-built torchvision
  fails on its C ops under a CPU torch; the transforms used here are Python over PIL)."""
  from big_vision_lite.convert import torch_env
  torch_env.setup()
  import torchvision.transforms as T
  return T


class _TorchImages:
  """The shards' JPEGs through torchvision's RandomResizedCrop training transforms."""

  def __init__(self, files: str):
    import glob
    self.files = sorted(glob.glob(files))
    self.source = None

  def __len__(self) -> int:
    from big_vision_lite.data import sources
    return len(sources.ArrayRecordSource(self.files))

  def __getitem__(self, i: int):
    from big_vision_lite.data import sources
    if self.source is None:  # opened in the worker
      T = _import_torchvision_transforms()
      self.source = sources.ArrayRecordSource(self.files)
      self.tf = T.Compose([T.RandomResizedCrop(224, scale=(0.05, 1.0)), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ex = self.source[i]
    return self.tf(Image.open(io.BytesIO(ex["image"])).convert("RGB")), int(ex["label"])


def _one_thread(_) -> None:
  import torch
  torch.set_num_threads(1)


def torchvision_loader(files: str, cores: int, batch: int, n_batches: int) -> float:
  import torch
  loader = torch.utils.data.DataLoader(_TorchImages(files), batch_size=batch, shuffle=True,
                                       num_workers=cores, drop_last=True, persistent_workers=True,
                                       worker_init_fn=_one_thread, multiprocessing_context="spawn",
                                       generator=torch.Generator().manual_seed(0))

  def forever():
    while True:
      yield from loader
  return _rate(forever(), batch, n_batches)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--toy", action="store_true", help="tiny sizes, for the test suite")
  ap.add_argument("--images", type=int, default=512, help="JPEGs written to the shards")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
  args = ap.parse_args(argv)
  if args.toy:
    args.images, args.batch, args.batches = 16, 4, 2
  hw = (75, 100) if args.toy else (375, 500)
  all_cores = os.cpu_count() or 1
  core_counts = sorted({1, min(2, all_cores), all_cores})
  print(bench_setup.cpu_line())
  print(f"{args.images} JPEGs {hw[1]}x{hw[0]} q90, batch {args.batch}, {args.batches} timed batches "
        f"after 1 warm-up; cores {core_counts}")
  with tempfile.TemporaryDirectory(prefix="bvl_pipe_") as tmp:
    files, jpegs = write_shards(tmp, args.images, 4, hw)
    print(f"mean JPEG size {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB")
    print(f"{'preprocessing':9s} {'cores':>5s} {'ours img/s':>11s} {'/core':>7s} {'tf.data':>9s} "
          f"{'/core':>7s} {'torchvision':>11s} {'/core':>7s} {'ours/tf':>8s} {'ours/tv':>8s}")
    for cores in core_counts:
      with _Pinned(cores):
        o = ours(files, OURS_TRAIN, cores, args.batch, args.batches)
      with _Pinned(cores):
        t = tf_data(jpegs, cores, args.batch, args.batches)
      with _Pinned(cores):
        v = torchvision_loader(files, cores, args.batch, args.batches)
      tf_cols = (f"{t:9.1f} {t / cores:7.1f}" if t else f"{'skipped':>9s} {'':>7s}")
      ratio_tf = f"{o / t:7.2f}x" if t else f"{'-':>8s}"
      print(f"{'train':9s} {cores:5d} {o:11.1f} {o / cores:7.1f} {tf_cols} {v:11.1f} {v / cores:7.1f} "
            f"{ratio_tf} {o / v:7.2f}x")
    with _Pinned(1):  # what a worker process costs: the same preprocessing in the main process
      inproc = ours(files, OURS_TRAIN, 0, args.batch, args.batches)
    print(f"{'train':9s} {1:5d} {inproc:11.1f} {inproc:7.1f}   (ours with num_workers=0: in the "
          f"main process, no worker)")
    for cores in core_counts:
      with _Pinned(cores):
        o = ours(files, OURS_SIGLIP, cores, args.batch, args.batches)
      print(f"{'siglip':9s} {cores:5d} {o:11.1f} {o / cores:7.1f}   (image-text: ours only)")


if __name__ == "__main__":
  from absl import flags
  flags.FLAGS(sys.argv[:1])  # grain reads absl flags
  main(sys.argv[1:])
