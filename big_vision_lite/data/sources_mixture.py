"""Data source `mixture`: several data sources read in set proportions, each with its own pp.

    c.input.data = dict(name="mixture", members=dict(
        single=dict(name="bvl_shapes", split="train", weight=1.0, pp="shapes_as_multi"),
        multi=dict(name="bvl_shapes_multi", split="train", weight=1.0)))

Each member is a data config (any source, tfds included) plus `weight` (> 0, relative) and `pp`
(optional): the member's ops run first, then `config.input.pp` on every example, so the members
need only agree on what `config.input.pp` reads. One epoch of the mixture holds every example
of every member at least once and each member's share of the epoch equals its share of the
weights; a member whose share is larger than its size repeats, in index order, within the epoch
(the trainer's global shuffle spreads the repeats). Deterministic: record i is a pure function
of the members' sizes and weights, so resume and the process layout work as for one source.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import ml_collections
import numpy as np

from big_vision_lite.config import ConfigError
from big_vision_lite.data import sources

NAME = "mixture"
MEMBER_KEY = "_mixture_member"  # which member a record came from, read and removed by the pp
_MEMBER_ONLY = ("weight", "pp")  # keys of a member that are not its data config


def members_of(data_config: ml_collections.ConfigDict, config_key: str
               ) -> list[tuple[str, ml_collections.ConfigDict, float, str]]:
  """(name, data config, weight, pp) per member of a mixture data config, checked."""
  members = data_config.get("members", None)
  if not members or not hasattr(members, "items"):
    raise ConfigError(f"{config_key}.members must map member names to data configs (each with "
                      "name, split, weight and optionally pp)")
  out = []
  for name, member in members.items():
    key = f"{config_key}.members.{name}"
    if not hasattr(member, "items"):
      raise ConfigError(f"{key} must be a data config dict, got {type(member).__name__}")
    weight = member.get("weight", None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        math.isfinite(weight) and weight > 0):
      raise ConfigError(f"{key}.weight must be a number > 0, got {weight!r}")
    pp = member.get("pp", "") or ""
    if not isinstance(pp, str):
      raise ConfigError(f"{key}.pp must be a preprocessing string, got {type(pp).__name__}")
    data = ml_collections.ConfigDict({k: v for k, v in member.items() if k not in _MEMBER_ONLY})
    if sources.source_kind(data.get("name") or "") is sources.source_kind(NAME):
      raise ConfigError(f"{key}.name: a mixture cannot be a member of a mixture")
    out.append((name, data, float(weight), pp))
  return out


def epoch_counts(lengths: list[int], weights: list[float]) -> list[int]:
  """Records per member in one epoch: every example at least once, shares as the weights."""
  total = sum(weights)
  shares = [w / total for w in weights]
  epoch = max(math.ceil(n / s - 1e-9) for n, s in zip(lengths, shares))
  return [max(n, int(round(s * epoch))) for n, s in zip(lengths, shares)]


class MixtureSource:
  """Random access over the members' records: [i] -> (member k's example, tagged with k)."""

  def __init__(self, names: list[str], member_sources: list[Any], weights: list[float],
               pps: list[str]):
    self.names, self.sources, self.pps = list(names), list(member_sources), list(pps)
    self.lengths = [len(s) for s in self.sources]
    self.counts = epoch_counts(self.lengths, list(weights))
    self._starts = list(np.cumsum([0] + self.counts[:-1]))
    self.skipped = sum(int(getattr(s, "skipped", 0) or 0) for s in self.sources)
    self.first_skipped = next((s.first_skipped for s in self.sources
                               if getattr(s, "skipped", 0)), None)

  def __len__(self) -> int:
    return sum(self.counts)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"mixture record {index} out of range ({len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    example = dict(self.sources[k][(index - self._starts[k]) % self.lengths[k]])
    example[MEMBER_KEY] = k
    return example

  def __repr__(self) -> str:
    parts = ", ".join(f"{n}: {c} of {length}"
                      for n, c, length in zip(self.names, self.counts, self.lengths))
    return f"MixtureSource({parts} records per epoch)"


class MixturePreprocess:
  """fn(example, rng): the example's member pp, then the shared one (picklable for workers)."""

  def __init__(self, member_pps: list[str], shared):
    from big_vision_lite.data import ops  # pylint: disable=import-outside-toplevel
    self.member_fns = [ops.get_preprocess_fn(pp) for pp in member_pps]
    self.shared = shared

  def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
    example = dict(example)
    k = int(example.pop(MEMBER_KEY))
    return self.shared(self.member_fns[k](example, rng), rng)


def preprocess_for(source: Any, fn):
  """`fn` for a plain source; for a mixture, its members' pps in front of `fn`."""
  if isinstance(source, MixtureSource):
    return MixturePreprocess(source.pps, fn)
  return fn


@sources.register(NAME, keys=("members",), required=("members",))
def _open_mixture(data_config: ml_collections.ConfigDict, config_key: str) -> MixtureSource:
  members = members_of(data_config, config_key)
  opened = []
  for name, data, _, _ in members:
    source = sources.get_source(data, config_key=f"{config_key}.members.{name}")
    if len(source) == 0:
      raise ConfigError(f"{config_key}.members.{name}: {data.get('name')}:{data.get('split')} "
                        "is empty")
    opened.append(source)
  return MixtureSource([m[0] for m in members], opened, [m[2] for m in members],
                       [m[3] for m in members])
