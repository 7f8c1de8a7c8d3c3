"""What a checkpoint folder holds: its item names, its complete steps, each step's array
names and metadata, and whether a target state fits them (orbax 0.12.8's layout)."""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from big_vision_lite.save_errors import short_error
from big_vision_lite.tree_names import flatten_with_names  # also this module's API

STATE_ITEM = "state"
DATA_ITEM = "data"
DIGEST_ITEM = "digest"
COMMIT_FILE = "commit_success.txt"


class CheckpointError(Exception):
  """A checkpoint is missing, incomplete, corrupt or incompatible with the target."""


# ----------------------------------------------------------------------------
# Completeness of a step folder.

def step_dir_problem(step_dir: epath.PathLike) -> str | None:
  """Returns why `step_dir` is not a complete checkpoint, or None if it is.

  Rule (orbax 0.12.8): it finalizes a step by writing `commit_success.txt` in it
  (into the tmp dir before the atomic rename on local disks, in place on GCS),
  so a step folder without it was interrupted mid-save or copied partially.
  We also require the state item's metadata to parse, and every item named in
  `_CHECKPOINT_METADATA` to exist, which catches hand-made partial copies.
  """
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():
    return "not a directory"
  try:
    committed = _exists(step_dir / COMMIT_FILE)
  except OSError as e:  # e.g. permission denied: not the same as an interrupted save
    return f"cannot check {step_dir / COMMIT_FILE}: {type(e).__name__}: {e}"
  if not committed:
    return f"no {COMMIT_FILE} (save was interrupted or never finalized)"
  state_md = step_dir / STATE_ITEM / "_METADATA"
  try:
    if "tree_metadata" not in json.loads(state_md.read_text()):
      return f"{state_md} has no tree_metadata"
  except (OSError, ValueError) as e:
    return f"unreadable {state_md}: {type(e).__name__}: {e}"
  try:
    items = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("item_handlers") or {}
  except (OSError, ValueError) as e:
    return f"unreadable {step_dir / '_CHECKPOINT_METADATA'}: {type(e).__name__}: {e}"
  for item in items:
    if not (step_dir / item).is_dir():
      return f"item folder {item!r} is missing"
  return None


def _exists(path: epath.Path) -> bool:
  """Whether `path` exists; unlike Path.exists(), an error other than "not found" is raised."""
  try:
    path.stat()
  except FileNotFoundError:
    return False
  return True


def scan_steps(directory: epath.PathLike) -> tuple[list[int], dict[int, str]]:
  """Returns (complete steps ascending, {incomplete step: reason}) under `directory`.

  Only plain-integer folder names are steps; orbax's in-flight
  `*.orbax-checkpoint-tmp-*` folders and our `*.incomplete-*` ones are not.
  """
  directory = epath.Path(directory)
  complete, incomplete = [], {}
  if not directory.is_dir():
    return complete, incomplete
  for p in directory.iterdir():
    if not p.name.isdigit() or not p.is_dir():
      continue
    problem = step_dir_problem(p)
    if problem is None:
      complete.append(int(p.name))
    else:
      incomplete[int(p.name)] = problem
  return sorted(complete), incomplete


# ----------------------------------------------------------------------------
# Array metadata and the target state.

def read_state_metadata(state_dir: epath.PathLike) -> dict[str, Any]:
  """{'params/a/b': ArrayMetadata(shape, dtype, ...)} for a saved state item."""
  state_dir = epath.Path(state_dir)
  try:
    # The handler (unlike StandardCheckpointer) raises on an unreadable OCDBT
    # index instead of logging and returning an empty tree.
    md = ocp.StandardCheckpointHandler().metadata(state_dir)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read checkpoint metadata in {state_dir}: {short_error(e)}") from e
  tree = getattr(md, "tree", md)
  return flatten_with_names(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def drop_names(tree: Any, names: set[str], prefix: str = "") -> Any:
  """`tree` (nested dicts) without the leaves named in `names`, nor dicts left empty by that."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if name in names:
      continue
    sub = drop_names(v, names, name + "/")
    if not (isinstance(sub, dict) and not sub and isinstance(v, dict) and v):
      out[k] = sub
  return out


def with_zeros(restored: Any, abstract: Any, names: set[str], prefix: str = "") -> Any:
  """`restored` with each leaf of `abstract` named in `names` added as zeros on its sharding."""
  if not isinstance(abstract, dict):
    if prefix.rstrip("/") in names:
      return jax.device_put(np.zeros(abstract.shape, abstract.dtype), abstract.sharding)
    return restored
  have = restored if isinstance(restored, dict) else {}
  return {k: with_zeros(have.get(k), v, names, f"{prefix}{k}/") for k, v in abstract.items()}


def check_compatible(state_dir: epath.PathLike, abstract_state: Any) -> None:
  """Raises CheckpointError listing missing/unexpected arrays and shape mismatches."""
  saved = read_state_metadata(state_dir)
  wanted = flatten_with_names(abstract_state)
  problems = []
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  if missing:
    problems.append(f"missing arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if unexpected:
    problems.append(f"unexpected arrays {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
  for name in sorted(set(saved) & set(wanted)):
    s, w = tuple(saved[name].shape), tuple(wanted[name].shape)
    if s != w:
      problems.append(f"shape mismatch for {name}: checkpoint {s} vs target {w}")
  if problems:
    raise CheckpointError(
        f"checkpoint {state_dir} does not match the target state: " + "; ".join(problems[:8]))
