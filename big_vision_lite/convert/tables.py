"""Conversion tables: named rules mapping our flat params to another library's keys and back.

One table per target is written once and used in both directions (export and
import). Every source key must be consumed by exactly one rule and every rule
must find its keys, else `ConversionError` lists all offenders: nothing is ever
skipped silently. Values always come out as float32 (bf16 training weights included).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Arrays = list[np.ndarray]
Fn = Callable[[Arrays], Arrays]


class ConversionError(ValueError):
  """Keys or shapes that a conversion table cannot account for."""


class UnsupportedExport(ConversionError):
  """A run whose model the export target cannot express (the CLI exits 2: a config error)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ours` keys <-> `theirs` keys; `to_theirs(ours values)` and `to_ours(their values)`."""
  ours: tuple[str, ...]
  theirs: tuple[str, ...]
  to_theirs: Fn
  to_ours: Fn


Table = list[Rule]


def to_f32(x) -> np.ndarray:
  """Any float array (bf16/fp16 included, via ml_dtypes) -> float32 numpy; others unchanged."""
  x = np.asarray(x)
  if x.dtype.kind == "f" or x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
    return x.astype(np.float32)
  if x.dtype.kind == "V":  # bf16 saved without ml_dtypes' descriptor cannot be guessed.
    raise ConversionError(f"array of opaque dtype {x.dtype} (bf16 saved without ml_dtypes?)")
  return x


# ----------------------------------------------------------------------------
# Rule builders. `o` and `t` are key prefixes on our side and theirs.

def _one(o: str, t: str, fwd: Callable[[np.ndarray], np.ndarray],
         bwd: Callable[[np.ndarray], np.ndarray]) -> Rule:
  return Rule((o,), (t,), lambda a: [fwd(a[0])], lambda a: [bwd(a[0])])


def same(o: str, t: str) -> Rule:
  return _one(o, t, lambda x: x, lambda x: x)


def reshaped(o: str, t: str, our_shape: Callable[[tuple], tuple], their_shape: Callable[[tuple], tuple]) -> Rule:
  """Same values, another shape each way (e.g. posemb (1,N,D) <-> (N,D))."""
  return _one(o, t, lambda x: x.reshape(their_shape(x.shape)), lambda x: x.reshape(our_shape(x.shape)))


def dense(o: str, t: str, bias: bool = True) -> list[Rule]:
  """Flax Dense kernel (in, out) <-> torch Linear weight (out, in)."""
  rules = [_one(f"{o}/kernel", f"{t}.weight", lambda x: x.T, lambda x: x.T)]
  return rules + ([same(f"{o}/bias", f"{t}.bias")] if bias else [])


def layer_norm(o: str, t: str) -> list[Rule]:
  return [same(f"{o}/scale", f"{t}.weight"), same(f"{o}/bias", f"{t}.bias")]


def conv(o: str, t: str) -> list[Rule]:
  """Flax Conv HWIO (P,P,C,D) <-> torch OIHW (D,C,P,P)."""
  return [_one(f"{o}/kernel", f"{t}.weight", lambda x: x.transpose(3, 2, 0, 1),
               lambda x: x.transpose(2, 3, 1, 0)),
          same(f"{o}/bias", f"{t}.bias")]


def _proj_fwd(k: np.ndarray) -> np.ndarray:  # (D, H, hd) -> (H*hd, D)
  return k.reshape(k.shape[0], -1).T


def heads_proj(o: str, t: str, heads: int) -> list[Rule]:
  """One of query/key/value: kernel (D,H,hd), bias (H,hd) <-> Linear (H*hd, D), (H*hd,)."""
  return [_one(f"{o}/kernel", f"{t}.weight", _proj_fwd, lambda w: w.T.reshape(w.shape[1], heads, -1)),
          _one(f"{o}/bias", f"{t}.bias", lambda b: b.reshape(-1), lambda b: b.reshape(heads, -1))]


def fused_heads_proj(srcs: Sequence[str], tw: str, tb: str, heads: int) -> list[Rule]:
  """Several of query/key/value fused on dim 0 (timm qkv / kv, torch in_proj_*)."""
  n = len(srcs)

  def w_bwd(a: Arrays) -> Arrays:
    return [w.T.reshape(w.shape[1], heads, -1) for w in np.split(a[0], n, axis=0)]

  def b_bwd(a: Arrays) -> Arrays:
    return [b.reshape(heads, -1) for b in np.split(a[0], n, axis=0)]

  return [Rule(tuple(f"{o}/kernel" for o in srcs), (tw,),
               lambda a: [np.concatenate([_proj_fwd(k) for k in a], axis=0)], w_bwd),
          Rule(tuple(f"{o}/bias" for o in srcs), (tb,),
               lambda a: [np.concatenate([b.reshape(-1) for b in a], axis=0)], b_bwd)]


def attn_out(o: str, t: str, heads: int) -> list[Rule]:
  """out kernel (H,hd,D) <-> Linear weight (D, H*hd)."""
  return [_one(f"{o}/kernel", f"{t}.weight", lambda k: k.reshape(-1, k.shape[-1]).T,
               lambda w: w.T.reshape(heads, -1, w.shape[0])),
          same(f"{o}/bias", f"{t}.bias")]


def constant(t: str, value: np.ndarray, what: str) -> Rule:
  """A tensor that is fixed on our side (e.g. sincos posemb) but a parameter on theirs.

  Importing checks their value still equals ours, since we cannot represent another.
  """
  value = np.asarray(value, np.float32)

  def bwd(a: Arrays) -> Arrays:
    if a[0].shape != value.shape or not np.allclose(a[0], value, atol=1e-5):
      raise ConversionError(f"{t} is not the fixed {what} our model computes; "
                            "import into a model with a learned one instead")
    return []

  return Rule((), (t,), lambda a: [value], bwd)


def prefixed(table: Iterable[Rule], ours: str = "", theirs: str = "") -> Table:
  """The same rules with key prefixes added (e.g. 'img/' and 'vision_model.')."""
  return [dataclasses.replace(r, ours=tuple(ours + k for k in r.ours),
                              theirs=tuple(theirs + k for k in r.theirs)) for r in table]


# ----------------------------------------------------------------------------
# Applying a table.

def _fmt(keys: Iterable[str], limit: int = 40) -> str:
  keys = sorted(keys)
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def apply(table: Table, src: Mapping[str, np.ndarray], direction: str, *, what: str = "",
          expect: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
  """Converts flat `src` with `table`; direction "to_theirs" (export) or "to_ours" (import).

  `expect` ({key: shape}) is the target's own key set (e.g. a torch state_dict):
  every key must be produced with that shape. Raises ConversionError naming every
  unmapped source key, missing source key, unfilled target key and bad shape.
  """
  if direction not in ("to_theirs", "to_ours"):
    raise ValueError(f"direction must be 'to_theirs' or 'to_ours', got {direction!r}")
  export = direction == "to_theirs"
  label = f"{what}: " if what else ""
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  missing: list[str] = []
  for rule in table:
    src_keys, dst_keys = (rule.ours, rule.theirs) if export else (rule.theirs, rule.ours)
    absent = [k for k in src_keys if k not in src]
    if absent:
      missing.extend(absent)
      continue
    used.update(src_keys)
    vals = getattr(rule, direction)([to_f32(src[k]) for k in src_keys])
    for k, v in zip(dst_keys, vals):
      if k in out:
        raise ConversionError(f"{label}two rules write {k} (table bug)")
      # np.array, not ascontiguousarray: that one turns 0-d scalars (open_clip logit_scale) into 1-d.
      out[k] = np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype, order="C")
  unused = set(src) - used
  problems = []
  if missing:
    problems.append(f"keys the table needs but the source lacks: {_fmt(missing)}")
  if unused:
    problems.append(f"source keys no rule maps (unmapped): {_fmt(unused)}")
  if expect is not None:
    unfilled = set(expect) - set(out)
    extra = set(out) - set(expect)
    bad = [f"{k}: got {tuple(out[k].shape)}, want {tuple(expect[k])}"
           for k in sorted(set(out) & set(expect)) if tuple(out[k].shape) != tuple(expect[k])]
    if unfilled:
      problems.append(f"target keys nothing fills: {_fmt(unfilled)}")
    if extra:
      problems.append(f"converted keys the target does not have: {_fmt(extra)}")
    if bad:
      problems.append(f"shape mismatches: {'; '.join(bad[:20])}")
  if problems:
    raise ConversionError(label + " | ".join(problems))
  return out


# ----------------------------------------------------------------------------
# Scanned <-> unrolled layers ("encoderblock" with a leading layer axis vs "encoderblock_{i}").

_SCANNED = re.compile(r"(^|.*/)encoderblock/(.*)$")
_UNROLLED = re.compile(r"(^|.*/)encoderblock_(\d+)/(.*)$")


def unscan(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits every scanned `.../encoderblock/...` param along its leading layer axis."""
  out = {}
  for k, v in flat.items():
    m = _SCANNED.match(k)
    if not m:
      out[k] = v
      continue
    v = np.asarray(v)
    for i in range(v.shape[0]):
      out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = v[i]
  return out


def scan(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacks every `.../encoderblock_{i}/...` family into one scanned `.../encoderblock/...`."""
  out, groups = {}, {}
  for k, v in flat.items():
    m = _UNROLLED.match(k)
    if not m:
      out[k] = v
      continue
    groups.setdefault(f"{m.group(1)}encoderblock/{m.group(3)}", {})[int(m.group(2))] = np.asarray(v)
  for k, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ConversionError(f"cannot scan {k}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
    out[k] = np.stack([layers[i] for i in range(len(layers))])
  return out


def is_scanned(flat: Mapping[str, np.ndarray]) -> bool:
  return any(_SCANNED.match(k) for k in flat)


def num_layers(flat: Mapping[str, np.ndarray], prefix: str = "") -> int:
  """Depth of the encoder under `prefix` (scanned or unrolled)."""
  depth = 0
  for k, v in flat.items():
    if not k.startswith(prefix):
      continue
    rest = k[len(prefix):]
    if (m := _UNROLLED.match(rest)):
      depth = max(depth, int(m.group(2)) + 1)
    elif _SCANNED.match(rest):
      depth = max(depth, np.shape(v)[0])
  return depth


def nest(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree
