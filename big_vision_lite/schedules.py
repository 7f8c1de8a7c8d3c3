"""Learning-rate schedule multipliers (in [0, 1]) from a config, big_vision style.

The base lr is applied elsewhere; a schedule is a pure jnp function of the step
so it can live inside a jitted train step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from big_vision_lite.config import ConfigError

DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")
_KNOWN_KEYS = frozenset({
    "warmup_steps", "warmup_percent", "decay_type", "linear_end", "end",
    "min_lr", "power", "timescale", "cooldown_steps", "cooldown_percent"})


def _as_dict(value: Any, key: str) -> dict[str, Any]:
  if value is None:
    return {}
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError(f"{key} must be a dict, got {type(value).__name__}")
  return dict(value)


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(sched: dict, name: str, default: float, lo: float | None = None,
            hi: float | None = None) -> float:
  value = sched.get(name, default)
  if not _is_real(value):
    raise ConfigError(f"config.schedule.{name} must be a number, got {value!r}")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise ConfigError(f"config.schedule.{name}={value} must be in [{lo}, {hi}]")
  return float(value)


def _phase_steps(sched: dict, prefix: str, total_steps: int) -> int:
  """Reads `<prefix>_steps` or `<prefix>_percent` (a fraction of total_steps)."""
  s_key, p_key = f"{prefix}_steps", f"{prefix}_percent"
  if s_key in sched and p_key in sched:
    raise ConfigError(f"config.schedule: give only one of {s_key} and {p_key}")
  if p_key in sched:
    return int(_number(sched, p_key, 0.0, 0.0, 1.0) * total_steps)
  steps = sched.get(s_key, 0)
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ConfigError(f"config.schedule.{s_key} must be a non-negative int, got {steps!r}")
  return steps


def make_schedule(config: Any, total_steps: int) -> Callable[[jax.typing.ArrayLike], jax.Array]:
  """Returns step -> lr multiplier in [0, 1] as described by `config.schedule`.

  Linear warmup from 0 to 1 over the warmup steps, then the decay runs from the
  end of warmup to `total_steps`; an optional linear cooldown to 0 over the last
  `cooldown_steps` multiplies on top (meant for rsqrt, allowed for all types).
  """
  sched = _as_dict(config.get("schedule") if hasattr(config, "get") else None,
                   "config.schedule")
  unknown = sorted(set(sched) - _KNOWN_KEYS)
  if unknown:
    raise ConfigError(f"config.schedule: unknown keys {unknown} (known: {sorted(_KNOWN_KEYS)})")
  if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 0:
    raise ValueError(f"total_steps must be a non-negative int, got {total_steps!r}")

  decay_type = sched.get("decay_type", "constant")
  if decay_type not in DECAY_TYPES:
    raise ConfigError(f"config.schedule.decay_type={decay_type!r} is not one of {DECAY_TYPES}")
  warmup = _phase_steps(sched, "warmup", total_steps)
  cooldown = _phase_steps(sched, "cooldown", total_steps)
  # Like big_vision: catch warmup >= total early, but allow 0/1-step debug runs.
  if total_steps > 1 and (warmup >= total_steps or warmup + cooldown > total_steps):
    raise ConfigError(f"config.schedule: warmup ({warmup}) must be < total_steps ({total_steps}) "
                     f"and warmup + cooldown ({cooldown}) <= total_steps")

  end_keys = [k for k in ("linear_end", "end", "min_lr") if k in sched]
  if len(end_keys) > 1:
    raise ConfigError(f"config.schedule: give only one of {end_keys}")
  end = _number(sched, end_keys[0], 0.0, 0.0, 1.0) if end_keys else 0.0
  power = _number(sched, "power", 1.0, 0.0)
  timescale = _number(sched, "timescale", 10_000, 1e-12)
  decay_len = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_len, 0.0, 1.0)
    if decay_type == "cosine":
      mult = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      mult = end + (1.0 - end) * (1.0 - progress) ** power
    elif decay_type == "rsqrt":
      mult = 1.0 / jnp.sqrt(1.0 + jnp.maximum(step - warmup, 0.0) / timescale)
    else:
      mult = jnp.ones_like(step)
    if warmup:
      mult = mult * jnp.minimum(1.0, step / warmup)
    if cooldown:
      mult = mult * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
    return mult.astype(jnp.float32)

  return schedule
