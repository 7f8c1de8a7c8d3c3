"""Turns an image folder, a CSV/JSONL list or tar shards into shuffled ArrayRecord train/validation shards.

  bvl-make-dataset INPUT OUT_DIR [--val-fraction 0.1] [--seed 0] [--shard-size 10000]
  python -m big_vision_lite.tools.make_dataset INPUT OUT_DIR ...

INPUT is a folder with one sub-folder per class (ROOT/CLASS/IMAGE), a .csv
(with a header) or .jsonl file with an `image` path (relative to the file's
folder) and a `caption` and/or `label` per row, or tar shards (KEY.jpg +
KEY.txt, a glob or a folder of .tar files). OUT_DIR gets
`train-NNNNN-of-MMMMM.array_record`, `validation-...` and `dataset_info.json`
(split sizes, class names, shuffled=true); docs/data.md has the record keys.
The output depends only on the input and --seed. An image that cannot be read
or decoded is skipped with one line naming it; a missing input exits 2.
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import sys
from typing import Sequence

import numpy as np

from big_vision_lite.data import dataset_info
from big_vision_lite.tools.dataset_inputs import Entry, InputError, Listing, list_input

SPLITS = ("train", "validation")


def split_indices(listing: Listing, val_fraction: float, seed: int) -> dict[str, list[int]]:
  """Shuffled entry indices per split; labelled inputs are split per class (stratified)."""
  rng = np.random.default_rng(seed)
  labels = [e.label for e in listing.entries]
  groups: dict = {}
  for i, label in enumerate(labels):
    groups.setdefault(label, []).append(i)
  train, val = [], []
  for label in sorted(groups, key=lambda x: -1 if x is None else x):
    members = [groups[label][j] for j in rng.permutation(len(groups[label]))]
    k = int(round(val_fraction * len(members)))
    val.extend(members[:k])
    train.extend(members[k:])
  return {"train": [train[j] for j in rng.permutation(len(train))],
          "validation": [val[j] for j in rng.permutation(len(val))]}


def _record(entry: Entry) -> tuple[dict | None, str | None]:
  """(record, None) for a readable entry, else (None, the reason)."""
  from PIL import Image
  try:
    example = entry.read()
  except OSError as e:
    return None, f"cannot read: {e.strerror or e}"
  image = example["image"]
  try:
    with Image.open(io.BytesIO(image)) as img:
      img.load()  # a full decode: truncated files fail here, as they would in training
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    return None, f"cannot decode image ({len(image)} bytes): {str(e).split(' <_io.')[0]}"
  record = {"image": image}
  if entry.label is not None:
    record["label"] = int(entry.label)
  caption = entry.caption if entry.caption is not None else example.get("caption")
  if caption is not None:
    record["caption"] = caption
  return record, None


def _shard_names(split: str, n: int, shard_size: int) -> list[str]:
  count = max(1, math.ceil(n / shard_size))
  return [f"{split}-{i:05d}-of-{count:05d}.array_record" for i in range(count)]


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
  old = sorted(glob.glob(os.path.join(out_dir, "*.array_record")))
  if os.path.exists(os.path.join(out_dir, dataset_info.INFO_FILE)):
    old.append(os.path.join(out_dir, dataset_info.INFO_FILE))
  if old and not overwrite:
    raise InputError(f"output folder {out_dir!r} already holds a dataset ({os.path.basename(old[0])}, ...); "
                     f"pass --overwrite to replace it")
  for path in old:
    os.remove(path)
  os.makedirs(out_dir, exist_ok=True)


def make_dataset(input_path: str, out_dir: str, *, kind: str = "auto", val_fraction: float = 0.1,
                 seed: int = 0, shard_size: int = 10_000, overwrite: bool = False,
                 log=None, **table_keys) -> dict:
  """Writes the shards and dataset_info.json (see the module doc); returns the summary; problems
  go to `log` (stderr)."""
  log = log or sys.stderr
  from big_vision_lite.data.sources import write_array_record
  if not 0 <= val_fraction < 1:
    raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
  if shard_size < 1:
    raise InputError(f"--shard-size must be >= 1, got {shard_size}")
  listing = list_input(input_path, kind, **table_keys)
  for problem in listing.problems:
    print(f"warning: {problem}", file=log)
  _prepare_out_dir(out_dir, overwrite)
  skipped = []
  splits = {}
  for split, order in split_indices(listing, val_fraction, seed).items():
    records = []
    for i in order:
      record, why = _record(listing.entries[i])
      if record is None:
        print(f"skipping {listing.entries[i].where}: {why}", file=log)
        skipped.append(f"{listing.entries[i].where}: {why}")
      else:
        records.append(record)
    names = _shard_names(split, len(records), shard_size)
    for j, name in enumerate(names):
      write_array_record(os.path.join(out_dir, name), records[j * shard_size:(j + 1) * shard_size])
    per_class = None
    if listing.class_names or any("label" in r for r in records):
      per_class = np.bincount([r["label"] for r in records if "label" in r], minlength=_num_classes(listing))
      per_class = [int(c) for c in per_class]
    splits[split] = {"num_examples": len(records), "files": names, "examples_per_class": per_class}
  if not any(s["num_examples"] for s in splits.values()):
    raise InputError(f"no readable image in {input_path!r} ({len(skipped)} skipped); nothing written")
  keys = {"image": "encoded image bytes as in the input file (PNG, JPEG, ...)"}
  if any(e.label is not None for e in listing.entries):
    keys["label"] = "int class id (index into class_names)"
  if any(e.caption is not None for e in listing.entries) or listing.kind == "tar":
    keys["caption"] = "str"
  info = {
      "format": dataset_info.FORMAT, "created_by": "big_vision_lite.tools.make_dataset",
      "input": input_path, "input_kind": listing.kind, "seed": seed, "val_fraction": val_fraction,
      "shuffled": True, "keys": keys, "splits": splits, "skipped": skipped,
      "num_classes": _num_classes(listing) if "label" in keys else None,
      "class_names": listing.class_names,
  }
  dataset_info.write(out_dir, info)
  return info


def _num_classes(listing: Listing) -> int:
  if listing.class_names:
    return len(listing.class_names)
  return 1 + max((e.label for e in listing.entries if e.label is not None), default=-1)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="bvl-make-dataset", description=__doc__.split("\n")[0])
  parser.add_argument("input", help="class folder, .csv/.jsonl list, or tar shards (glob or folder)")
  parser.add_argument("out_dir", help="folder for the .array_record shards and dataset_info.json")
  parser.add_argument("--kind", default="auto", choices=("auto", "folder", "csv", "jsonl", "tar"))
  parser.add_argument("--val-fraction", type=float, default=0.1, help="held out per class (default 0.1)")
  parser.add_argument("--seed", type=int, default=0, help="shuffle and split seed (default 0)")
  parser.add_argument("--shard-size", type=int, default=10_000, help="examples per shard")
  parser.add_argument("--image-key", default="image", help="CSV/JSONL column with the image path")
  parser.add_argument("--caption-key", default="caption", help="CSV/JSONL column with the caption")
  parser.add_argument("--label-key", default="label", help="CSV/JSONL column with the label (int or name)")
  parser.add_argument("--image-root", default=None, help="CSV/JSONL image paths are relative to this")
  parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT_DIR")
  args = parser.parse_args(argv)
  try:
    info = make_dataset(args.input, args.out_dir, kind=args.kind, val_fraction=args.val_fraction,
                        seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite,
                        image_key=args.image_key, caption_key=args.caption_key,
                        label_key=args.label_key, image_root=args.image_root)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  classes = f", {info['num_classes']} classes" if info["num_classes"] else ""
  for split, entry in info["splits"].items():
    print(f"{split}: {entry['num_examples']} examples{classes} in {len(entry['files'])} shard(s): "
          f"{os.path.join(args.out_dir, split)}-*.array_record")
  if info["skipped"]:
    print(f"{len(info['skipped'])} unreadable images skipped (listed in {dataset_info.INFO_FILE})")
  print(f"wrote {os.path.join(args.out_dir, dataset_info.INFO_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
