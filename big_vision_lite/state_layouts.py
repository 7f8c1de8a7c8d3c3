"""Older train-state layouts a checkpoint may have, and their mapping onto the current one.

Before the loss guard became an optax wrapper (loss_guard.skip_bad_updates), its state was a
top-level `guard` dict of the train state beside an unwrapped `opt_state`:

  {"params", "opt_state": <inner optimizer state>, "step", "rng",
   "guard": {"losses", "count", "nonfinite", "spikes", "first_nonfinite"[, "in_a_row",
             "most_in_a_row"]}}

(the two run counters came last, so the oldest checkpoints lack them). The same arrays now
live in the LossGuardState inside `opt_state`, its `inner_state` the old `opt_state`. The
counters mean the same in both: `first_nonfinite` is the 1-based step either way, since every
step adds one to exactly one of count, nonfinite and spikes.
"""

from __future__ import annotations

from typing import Any

import jax

from big_vision_lite import loss_guard

OLD_GUARD = "guard"  # the previous layout's top-level entry
# A stateful task's state (tasks/__init__.py); checkpoints written before it existed lack it.
TASK_STATE = "task_state"
GUARD_FIELDS = ("losses", "count", "nonfinite", "spikes", "first_nonfinite", "in_a_row",
                "most_in_a_row")
ADDED_LATER = ("in_a_row", "most_in_a_row")  # what checkpoints older still may lack


def _is_guard(x: Any) -> bool:
  return isinstance(x, loss_guard.LossGuardState)


def is_old_guard_layout(saved_names: Any) -> bool:
  """Whether a checkpoint's array names (checkpoint_layout.read_state_metadata) are the old layout."""
  return f"{OLD_GUARD}/count" in saved_names


def to_old_guard_layout(state: dict) -> dict:
  """The current-layout `state` (arrays or ShapeDtypeStructs) in the old layout."""
  guard = loss_guard.find(state["opt_state"])
  inner = jax.tree.map(lambda x: x.inner_state if _is_guard(x) else x, state["opt_state"],
                       is_leaf=_is_guard)
  return {**{k: v for k, v in state.items() if k != "opt_state"}, "opt_state": inner,
          OLD_GUARD: {k: getattr(guard, k) for k in GUARD_FIELDS}}


def from_old_guard_layout(old: dict, like: dict) -> dict:
  """An old-layout state restored onto to_old_guard_layout(`like`), in `like`'s layout."""
  leaves, treedef = jax.tree.flatten(like["opt_state"], is_leaf=_is_guard)
  # The old opt_state is `like`'s with each LossGuardState replaced by its inner state.
  old_leaves = treedef.flatten_up_to(old["opt_state"])
  g = old[OLD_GUARD]
  new_leaves = [loss_guard.LossGuardState(o, *(g[k] for k in GUARD_FIELDS)) if _is_guard(n) else o
                for n, o in zip(leaves, old_leaves)]
  return {**{k: v for k, v in old.items() if k != OLD_GUARD},
          "opt_state": jax.tree.unflatten(treedef, new_leaves)}
