"""Partial loading of pretrained params (our checkpoints or big_vision .npz files)
into a target params tree, with a report of what was loaded, missing or resized."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from big_vision_lite.models.vit import resample_posemb
from big_vision_lite.checkpoint_layout import (
    STATE_ITEM, CheckpointError, read_state_metadata, scan_steps, step_dir_problem)
from big_vision_lite.tree_names import flatten_with_names, path_str
from big_vision_lite.save_errors import short_error


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` did, by '/'-joined param name."""
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)      # in target, not in ckpt
  unexpected: list[str] = dataclasses.field(default_factory=list)   # in ckpt, not in target
  reshaped: list[str] = dataclasses.field(default_factory=list)     # "name: (1,16,D) -> (1,64,D)"
  mismatched: list[str] = dataclasses.field(default_factory=list)   # "name: ckpt (..) vs target (..)"

  def __str__(self) -> str:
    lines = [f"Loaded {len(self.loaded)} params from {self.source}"]
    for title, items in (("resampled", self.reshaped), ("missing (kept init)", self.missing),
                         ("unexpected (ignored)", self.unexpected),
                         ("shape mismatch (kept init)", self.mismatched)):
      if items:
        lines.append(f"  {title}: {len(items)}")
        lines.extend(f"    {x}" for x in items)
    return "\n".join(lines)


def _resample_posemb_grid(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes a (1, N, D) position embedding on its square grid to `num_tokens` tokens."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(f"posemb token count {num_tokens} is not a square grid")
  return resample_posemb(posemb, (side, side))


def _can_resample(name: str, src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
  return (name.split("/")[-1] == "pos_embedding" and len(src) == 3 and len(dst) == 3
          and src[0] == dst[0] == 1 and src[2] == dst[2]
          and math.isqrt(src[1]) ** 2 == src[1] and math.isqrt(dst[1]) ** 2 == dst[1])


def _strip_prefix(flat: dict[str, Any], prefix: str, source: str) -> dict[str, Any]:
  if not prefix:
    return flat
  out = {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")}
  if not out:
    raise CheckpointError(f"{source}: nothing under {prefix!r} (top-level keys: "
                          f"{sorted({k.split('/')[0] for k in flat})[:10]})")
  return out


def _read_npz(path: epath.Path, subtree: str | None) -> dict[str, np.ndarray]:
  try:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
      flat = {k: np.asarray(z[k]) for k in z.files}
  except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types.
    raise CheckpointError(f"cannot read {path}: {short_error(e)}") from e
  # big_vision's own .npz checkpoints put params under "params/" beside "opt/".
  if subtree is None and any(k.startswith("params/") for k in flat):
    subtree = "params"
  return _strip_prefix(flat, subtree or "", str(path))


def _resolve_state_dir(path: epath.Path) -> epath.Path:
  """A workdir, a step folder or a state folder of ours -> the state folder."""
  if (path / "checkpoints").is_dir():  # a training workdir
    path = path / "checkpoints"
  if (path / "_METADATA").exists():
    return path
  if (path / STATE_ITEM).is_dir():
    problem = step_dir_problem(path)
    if problem:
      raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    return path / STATE_ITEM
  complete, incomplete = scan_steps(path)
  if not complete:
    extra = f" (incomplete: {sorted(incomplete)})" if incomplete else ""
    raise CheckpointError(f"{path} holds no complete checkpoint{extra}")
  return path / str(complete[-1]) / STATE_ITEM


def _read_orbax(path: epath.Path, subtree: str | None) -> tuple[dict[str, np.ndarray], str]:
  if "://" not in str(path):  # Orbax wants absolute paths; users pass runs/vit
    path = epath.Path(os.path.abspath(str(path)))
  state_dir = _resolve_state_dir(path)
  prefix = "params" + (f"/{subtree}" if subtree else "")
  names = _strip_prefix(read_state_metadata(state_dir), prefix, str(state_dir))
  # Build a nested item of just the wanted arrays so orbax reads nothing else,
  # straight into host numpy (no mesh needed).
  item, restore_args = {}, {}
  for name, md in names.items():
    node_i, node_r = item, restore_args
    parts = prefix.split("/") + name.split("/")
    for p in parts[:-1]:
      node_i, node_r = node_i.setdefault(p, {}), node_r.setdefault(p, {})
    node_i[parts[-1]] = jax.ShapeDtypeStruct(tuple(md.shape), md.dtype)
    node_r[parts[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read params from {state_dir}: {short_error(e)}") from e
  flat = _strip_prefix(flatten_with_names(restored), prefix, str(state_dir))
  return {k: np.asarray(v) for k, v in flat.items()}, str(state_dir)


def read_params(path: str, subtree: str | None = None) -> dict[str, np.ndarray]:
  """Flat {'a/b/c': array} params of a workdir (latest complete step), step folder or .npz."""
  p = epath.Path(path)
  if str(path).endswith(".npz"):
    return _read_npz(p, subtree)
  return _read_orbax(p, subtree)[0]


def _place(value: np.ndarray, like: Any) -> Any:
  """Casts to `like`'s dtype and puts it where `like` lives (device sharding or host)."""
  value = np.asarray(value).astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None:
    return jax.device_put(value, sharding)
  return value


# An MoE expert weight and the dense MLP weight it is upcycled from (models/vmoe.py names).
_EXPERT_RE = re.compile(r"^(.*)/MoeMlpBlock_0/experts/(Dense_[01]/(?:kernel|bias))$")


def _upcycle(ckpt: dict[str, np.ndarray], names: list[str]) -> tuple[dict[str, np.ndarray], set[str]]:
  """Adds expert params tiled from the dense MlpBlock_0 they replace; returns them and the sources used."""
  added, used = {}, set()
  for name in names:
    m = _EXPERT_RE.match(name)
    src = f"{m.group(1)}/MlpBlock_0/{m.group(2)}" if m else None
    if src is not None and name not in ckpt and src in ckpt:
      added[name] = src
      used.add(src)
  return added, used


def load_pretrained(params_target: Any, path: str, *, subtree: str | None = None,
                    resample_posemb: bool = True, allow_mismatch: bool = False,
                    upcycle: bool = False, target_prefix: str = "") -> tuple[Any, LoadReport]:
  """Returns (params shaped like `params_target`, LoadReport).

  `path` is a .npz of flat 'a/b/c' keys (big_vision style; a 'params/' prefix
  is stripped) or a Checkpointer workdir / step folder / state folder (latest
  complete step; only state/params is read). `subtree` selects a '/'-separated
  prefix inside the checkpoint's params (e.g. 'img' of a two-tower model).
  A leaf is loaded when its name and shape match; a `pos_embedding` (1, N, D)
  with another square token count is resampled; target leaves not in the
  checkpoint keep their value. A shape mismatch raises CheckpointError unless
  `allow_mismatch`, which keeps the target value instead. Loaded values take the
  target leaf's dtype and, for jax.Array / ShapeDtypeStruct leaves, its sharding.

  `upcycle` (sparse upcycling, dense ViT -> MoE-ViT): every expert of an MoE
  block's `MoeMlpBlock_0/experts/Dense_i` starts as a copy of that block's dense
  `MlpBlock_0/Dense_i`; the routers keep their init.

  `target_prefix` puts the checkpoint's params under that '/'-separated prefix of
  the target (e.g. a ViT classifier checkpoint into 'img' of a two-tower model,
  for LiT); target leaves outside the prefix are kept and not reported missing.
  """
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"pretrained checkpoint {path} does not exist")
  if p.is_dir():
    ckpt, source = _read_orbax(p, subtree)
  else:
    ckpt, source = _read_npz(p, subtree), str(p)
  target_prefix = target_prefix.strip("/")
  if target_prefix:
    ckpt = {f"{target_prefix}/{k}": v for k, v in ckpt.items()}

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params_target)
  report = LoadReport(source=source)
  upcycled, upcycle_sources = ({}, set())
  if upcycle:
    upcycled, upcycle_sources = _upcycle(ckpt, [path_str(kp) for kp, _ in leaves])
    if not upcycled:
      raise CheckpointError(f"{source}: upcycle=True but no MoE expert param of the target has a "
                            "dense MlpBlock_0 counterpart in the checkpoint")
  out = []
  for kp, leaf in leaves:
    name = path_str(kp)
    if name in upcycled:
      value, want = ckpt[upcycled[name]], tuple(leaf.shape)
      if tuple(value.shape) != want[1:]:
        report.mismatched.append(f"{name}: dense {upcycled[name]} {value.shape} vs experts {want}")
        out.append(leaf)
        continue
      report.loaded.append(f"{name} (upcycled from {upcycled[name]})")
      out.append(_place(np.broadcast_to(value, want), leaf))
      continue
    if name not in ckpt:
      if not target_prefix or name.startswith(target_prefix + "/"):
        report.missing.append(name)
      out.append(leaf)
      continue
    value, want = ckpt[name], tuple(leaf.shape)
    if value.shape != want:
      if resample_posemb and _can_resample(name, value.shape, want):
        report.reshaped.append(f"{name}: {value.shape} -> {want}")
        value = _resample_posemb_grid(value, want[1])
      else:
        report.mismatched.append(f"{name}: checkpoint {value.shape} vs target {want}")
        out.append(leaf)
        continue
    report.loaded.append(name)
    out.append(_place(value, leaf))
  target_names = {path_str(kp) for kp, _ in leaves}
  report.unexpected = sorted(set(ckpt) - target_names - upcycle_sources)
  if report.mismatched and not allow_mismatch:
    raise CheckpointError(f"{source}: shape mismatch for {'; '.join(report.mismatched[:5])}"
                          " (pass allow_mismatch=True to keep the target init for these)")
  return jax.tree_util.tree_unflatten(treedef, out), report
