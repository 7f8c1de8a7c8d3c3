"""The preprocessing-op registry and the parser that turns `"decode|resize(32)|..."` into one function.

Every op is registered as a factory: `factory(*args, **kwargs)` returns `op(example, rng) -> example`,
working on one example (a dict of numpy values) and drawing randomness only from `rng`.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable

import numpy as np

from big_vision_lite.registry import Registry

# The op modules: data/ops_*.py (and randaug), found on the first lookup (registry.py).
OPS = Registry("preprocessing op", "big_vision_lite.data", modules=("ops_*", "randaug"))

Example = dict[str, Any]
Op = Callable[[Example, "np.random.Generator | None"], Example]


def split_spec(spec: str) -> list[str]:
  """Splits on top-level `|`, so a `|` inside a quoted argument or brackets stays put."""
  pieces, current, depth, quote = [], [], 0, None
  for ch in spec:
    if quote:
      current.append(ch)
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
      current.append(ch)
    elif ch in "([{":
      depth += 1
      current.append(ch)
    elif ch in ")]}":
      depth -= 1
      current.append(ch)
    elif ch == "|" and depth == 0:
      pieces.append("".join(current))
      current = []
    else:
      current.append(ch)
  pieces.append("".join(current))
  return [p.strip() for p in pieces]


def parse_op(piece: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """`"resize(32, method='nearest')"` -> `("resize", (32,), {"method": "nearest"})`; literals only."""
  bad = ValueError(f"malformed preprocessing op {piece!r}: expected `name` or `name(literal args...)`")
  try:
    node = ast.parse(piece, mode="eval").body
  except SyntaxError:
    raise bad from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise bad
  try:
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
      raise ValueError
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError:
    raise ValueError(f"malformed preprocessing op {piece!r}: arguments must be Python literals") from None
  return node.func.id, args, kwargs


def build_op(piece: str) -> Op:
  """Parses one piece of a spec and calls its registered factory."""
  name, args, kwargs = parse_op(piece)
  factory = OPS.get(name)
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise TypeError(f"bad arguments for preprocessing op {name!r} in {piece!r}: {e}") from None
  return factory(*args, **kwargs)


class PreprocessFn:
  """The ops of a spec applied left to right. Pickles as its spec string, so grain workers can rebuild it."""

  def __init__(self, spec: str):
    self.spec = spec
    pieces = split_spec(spec) if spec.strip() else []
    for piece in pieces:
      if not piece:
        raise ValueError(f"malformed preprocessing spec {spec!r}: empty op between '|'")
    self._ops = [(piece, build_op(piece)) for piece in pieces]
    self._ops = _fuse(pieces, self._ops)

  def __call__(self, example: Example, rng: np.random.Generator | None = None) -> Example:
    example = dict(example)
    for piece, op in self._ops:
      try:
        example = op(example, rng)
      except Exception as e:
        e.add_note(f"in preprocessing op {piece!r} of {self.spec!r}")
        raise
    return example

  def __getstate__(self) -> dict[str, Any]:
    return {"spec": self.spec}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["spec"])

  def __repr__(self) -> str:
    return f"PreprocessFn({self.spec!r})"


def _bound(piece: str) -> tuple[str, dict[str, Any]]:
  """An op's name and all its arguments, defaults included."""
  name, args, kwargs = parse_op(piece)
  bound = inspect.signature(OPS.get(name)).bind(*args, **kwargs)
  bound.apply_defaults()
  return name, dict(bound.arguments)


def _fuse(pieces: list[str], built: list[tuple[str, Op]]) -> list[tuple[str, Op]]:
  """Runs `decode|inception_crop(...)` on one key as decode_jpeg_and_inception_crop.

  The fused op is bitwise equal to the pair (tests/test_data_ops.py checks it) and skips
  two full-size image copies, so every spec written the big_vision_lite way gets it.
  """
  out, i = [], 0
  while i < len(built):
    if i + 1 < len(built):
      (first, a), (second, b) = _bound(pieces[i]), _bound(pieces[i + 1])
      if (first, second) == ("decode", "inception_crop") and a["channels"] == 3 \
          and a["key"] == b["key"]:
        fused = OPS.get("decode_jpeg_and_inception_crop")(
            b["size"], b["area_min"], b["area_max"], b["resize_method"], key=a["key"],
            max_pixels=a["max_pixels"])
        out.append((f"{pieces[i]}|{pieces[i + 1]}", fused))
        i += 2
        continue
    out.append(built[i])
    i += 1
  return out


def get_preprocess_fn(spec: str) -> PreprocessFn:
  """Builds `fn(example, rng) -> example` from `"op1|op2(args)|..."`; an empty spec is the identity.

  Raises KeyError for an unknown op (with the closest known name), ValueError for a malformed piece
  and TypeError for arguments the op does not take; all at build time, before any data is read.
  """
  if not isinstance(spec, str):
    raise TypeError(f"preprocessing spec must be a string, got {type(spec).__name__}")
  return PreprocessFn(spec)


# Helpers shared by the op modules.

def need_rng(rng: np.random.Generator | None, name: str) -> np.random.Generator:
  if rng is None:
    raise ValueError(f"preprocessing op {name!r} is random and needs an rng (got None)")
  return rng


def get_key(example: Example, key: str, name: str) -> Any:
  if key not in example:
    raise KeyError(f"preprocessing op {name!r} needs key {key!r}; the example has {sorted(example)}")
  return example[key]


def image_op(name: str, key: str, fn: Callable[[np.ndarray, np.random.Generator | None], np.ndarray]) -> Op:
  """An op that replaces `example[key]` by `fn(image, rng)`, leaving the input dict untouched."""
  def op(example: Example, rng: np.random.Generator | None = None) -> Example:
    image = np.asarray(get_key(example, key, name))
    out = dict(example)
    out[key] = fn(image, rng)
    return out
  return op

