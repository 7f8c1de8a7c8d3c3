"""Builds the optax optimizer from a training config, with big_vision semantics.

Chain (per trainable param): clip -> scale (adam/...) -> lr * lr_mult ->
+ wd * wd_mult * param -> * -schedule(step); frozen params get set_to_zero and
hold no optimizer state. Decoupled weight decay is scaled by the schedule but
not by the base lr, exactly like big_vision.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from big_vision_lite.schedules import make_schedule
from big_vision_lite.config import ConfigError
from big_vision_lite.tree_names import path_str

__all__ = ["make_optimizer", "make_schedule", "tree_paths", "match_regexes", "global_norm",
           "OPTAX_NAMES"]


# ----------------------------------------------------------------------------- tree helpers

def tree_paths(tree: Any) -> Any:
  """Returns a tree like `tree` whose leaves are "/"-joined key paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path), tree)


def match_regexes(tree: Any, patterns: Sequence[tuple[str, Any]], default: Any, *,
                  name: str | None = None) -> Any:
  """Maps each leaf to the value of the first regex fully matching its path.

  Unmatched leaves get `default`. With `name` (the config key, for the message),
  a regex that matches no path at all raises, so typos do not pass silently.
  """
  paths = jax.tree.leaves(tree_paths(tree))
  compiled = []
  for regex, value in patterns:
    try:
      compiled.append((re.compile(regex), value))
    except re.error as e:
      raise ValueError(f"{name or 'regex'}: invalid regex {regex!r}: {e}") from None
  if name is not None:
    for (pattern, _), (regex, _) in zip(compiled, patterns):
      if not any(pattern.fullmatch(p) for p in paths):
        hint = " (param paths never start with '/')" if regex.startswith("/") else ""
        raise ValueError(f"{name}: regex {regex!r} matches no parameter{hint}; "
                         f"e.g. paths are {paths[:3]}")

  def lookup(path):
    for pattern, value in compiled:
      if pattern.fullmatch(path):
        return value
    return default

  return jax.tree.map(lookup, tree_paths(tree))


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
                      jnp.float32(0.0)))


def all_finite(tree: Any) -> jax.Array:
  """True where every element of every leaf is finite (no overflow, unlike a norm)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _map_unmasked(fn: Callable[..., Any], updates: Any, *rest: Any) -> Any:
  # Inside optax.partition the trainable chain sees MaskedNode for frozen leaves;
  # our per-leaf constant trees still have full structure, so keep masked nodes.
  return jax.tree.map(lambda u, *r: u if _is_masked(u) else fn(u, *r),
                      updates, *rest, is_leaf=_is_masked)


class _EmptyState(NamedTuple):
  pass


def _scale_by_tree(mults: Any) -> optax.GradientTransformation:
  """Multiplies each update by its own (static, python float) factor."""
  def update(updates, state, params=None):
    del params
    return _map_unmasked(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state
  return optax.GradientTransformation(lambda _: _EmptyState(), update)


def _add_decayed_weights_tree(decays: Any) -> optax.GradientTransformation:
  """updates += decay * param per leaf; leaves with decay 0 are left as is."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs params: call tx.update(grads, state, params)")
    fn = lambda u, d, p: u if d == 0 else u + jnp.asarray(d, u.dtype) * p.astype(u.dtype)
    return _map_unmasked(fn, updates, decays, params), state
  return optax.GradientTransformation(lambda _: _EmptyState(), update)


# ----------------------------------------------------------------------------- scalers

def _adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
          mu_dtype: Any = None, nesterov: bool = False) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                             nesterov=nesterov)


def _adafactor(min_dim_size_to_factor: int = 32, decay_rate: float = 0.8,
               decay_offset: int = 0, beta2_cap: float = 0.999,
               clipping_threshold: float | None = None, momentum: float | None = 0.9,
               dtype_momentum: Any = "bfloat16", eps: float = 1e-30,
               ) -> optax.GradientTransformation:
  """big_vision's scale_by_adafactor: factored rms, capped beta2, optional momentum."""
  def decay_rate_pow(i, exponent):
    t = jnp.asarray(i, jnp.float32) + 1.0
    return jnp.minimum(beta2_cap, 1.0 - t ** (-exponent))

  return optax.chain(
      optax.scale_by_factored_rms(
          factored=True, decay_rate=decay_rate, step_offset=decay_offset,
          min_dim_size_to_factor=min_dim_size_to_factor, epsilon=eps,
          decay_rate_fn=decay_rate_pow),
      optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity(),
      optax.ema(momentum, debias=False, accumulator_dtype=jnp.dtype(dtype_momentum))
      if momentum else optax.identity())


def _lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None
          ) -> optax.GradientTransformation:
  return optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype)


def _sgd(momentum: float | None = None, nesterov: bool = False,
         accumulator_dtype: Any = None) -> optax.GradientTransformation:
  if not momentum:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)


_SCALERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": _adam,  # decoupled wd is added for every optimizer, from config.wd
    "scale_by_adam": _adam,
    "adafactor": _adafactor,
    "lion": _lion,
    "sgd": _sgd,
}
OPTAX_NAMES = tuple(sorted(_SCALERS))


# ----------------------------------------------------------------------------- config parsing

def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(config: Any, key: str, default: Any = None) -> Any:
  value = config.get(key, default)
  return default if value is None and default is not None else value


def _real(config: Any, key: str, default: Any, *, minimum: float = 0.0) -> float:
  value = _get(config, key, default)
  if not _is_real(value) or value < minimum:
    raise ConfigError(f"config.{key} must be a number >= {minimum}, got {value!r}")
  return float(value)


def _pairs(config: Any, key: str, default: list, *, positive: bool = False) -> list:
  value = _get(config, key, default)
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise ConfigError(f"config.{key} must be a list of (regex, multiplier) pairs, got {value!r}")
  pairs = []
  for item in value:
    if (isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2
        or not isinstance(item[0], str) or not _is_real(item[1]) or item[1] < 0):
      raise ConfigError(f"config.{key}: each entry must be (regex: str, multiplier >= 0), "
                       f"got {item!r}")
    if positive and item[1] == 0:
      raise ConfigError(f"config.{key}: multiplier 0 for {item[0]!r}; use config.frozen to "
                       "freeze params (it also drops their optimizer state)")
    pairs.append((item[0], float(item[1])))
  return pairs


def _regexes(config: Any, key: str) -> list[str]:
  value = _get(config, key, [])
  if isinstance(value, str) or not isinstance(value, Sequence) or not all(
      isinstance(v, str) for v in value):
    raise ConfigError(f"config.{key} must be a list of regex strings, got {value!r}")
  return list(value)


def _scaler(config: Any) -> optax.GradientTransformation:
  name = _get(config, "optax_name")
  if name not in _SCALERS:
    raise ConfigError(f"config.optax_name={name!r} is not one of {list(OPTAX_NAMES)}")
  kwargs = _get(config, "optax", {})
  if hasattr(kwargs, "to_dict"):
    kwargs = kwargs.to_dict()
  if not isinstance(kwargs, dict):
    raise ConfigError(f"config.optax must be a dict of kwargs, got {kwargs!r}")
  for key in ("lr", "learning_rate", "weight_decay", "wd"):
    if key in kwargs:
      raise ConfigError(f"config.optax.{key}: set the top-level config.lr / config.wd instead")
  allowed = list(inspect.signature(_SCALERS[name]).parameters)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ConfigError(f"config.optax: unknown keys {unknown} for optax_name={name!r} "
                     f"(known: {allowed})")
  return _SCALERS[name](**kwargs)


def make_optimizer(config: Any, params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """Returns (optax transform, step -> lr for logging) built from the training config.

  `params` is only used for its structure and paths (abstract arrays are fine).
  """
  schedule = make_schedule(config, total_steps)
  lr = _real(config, "lr", None)
  wd = _real(config, "wd", 0.0)
  clip = _get(config, "grad_clip_norm")
  if clip is not None and (not _is_real(clip) or clip < 0):
    raise ConfigError(f"config.grad_clip_norm must be None or a number >= 0, got {clip!r}")

  frozen_regexes = _regexes(config, "frozen")
  user_wd_mults = _get(config, "wd_mults") is not None
  wd_mults = _pairs(config, "wd_mults", [(".*/kernel$", 1.0)])
  lr_mults = _pairs(config, "lr_mults", [], positive=True)

  # Validate every user-written regex against the params, so a typo fails loudly.
  frozen = match_regexes(params, [(r, True) for r in frozen_regexes], False,
                         name="config.frozen")
  wd_tree = match_regexes(params, wd_mults, 0.0,
                          name="config.wd_mults" if user_wd_mults else None)
  lr_tree = match_regexes(params, lr_mults, 1.0, name="config.lr_mults")

  txs = []
  if clip:
    txs.append(optax.clip_by_global_norm(float(clip)))
  txs.append(_scaler(config))
  txs.append(_scale_by_tree(jax.tree.map(lambda m: lr * m, lr_tree)))
  if wd:
    txs.append(_add_decayed_weights_tree(jax.tree.map(lambda m: wd * m, wd_tree)))
  txs.append(optax.scale_by_schedule(lambda count: -schedule(count)))
  tx = optax.chain(*txs)

  if any(jax.tree.leaves(frozen)):
    # partition (not a mask on zeroed updates) so frozen towers hold no state.
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)

  return tx, lambda step: lr * schedule(step)
