"""Names of a jax tree's leaves as "/"-joined key paths: what checkpoints, digests, optimizer
rules and exports call each array."""

from __future__ import annotations

from typing import Any

import jax


def _key_str(key: Any) -> str:
  # DictKey / FlattenedIndexKey .key, GetAttrKey .name, SequenceKey .idx (each has one of them).
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """'params/Transformer/encoderblock_0/...' for a jax tree path."""
  return "/".join(_key_str(k) for k in path)


def flatten_with_names(tree: Any, is_leaf=None) -> dict[str, Any]:
  """{'params/a/b': leaf} for a jax tree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(p): v for p, v in leaves}
