"""The loss guard: an optax wrapper that drops non-finite updates and loss spikes.

Like MaxText's / Levanter's `skip_step_on_spikes`, it wraps the whole optimizer and takes the
step's loss as an extra argument (`tx.update(grads, state, params, loss=loss)`). Its state (the
last `window` accepted losses and the skip counters) lives in the optimizer state, so it is
checkpointed with it and a resumed run judges spikes on the history an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LossGuardState(NamedTuple):
  """Counters are int32 scalars; `losses` is a ring buffer of accepted losses."""
  inner_state: Any
  losses: jax.Array
  count: jax.Array  # losses accepted so far (the ring buffer's write position)
  nonfinite: jax.Array  # updates skipped for a non-finite loss, gradient or updated params
  spikes: jax.Array  # updates skipped as loss spikes
  first_nonfinite: jax.Array  # 1-based step of the first non-finite update; 0 = none yet
  in_a_row: jax.Array  # skipped updates since the last accepted one
  most_in_a_row: jax.Array  # the longest such run so far


def _global_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
                      jnp.float32(0.0)))


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def judge(losses: jax.Array, count: jax.Array, loss: jax.Array, finite: jax.Array, *,
          window: int, k: float, min_steps: int, std_floor: float) -> jax.Array:
  """True where `loss` is a spike: loss > mean + k * max(std, std_floor * |mean|) over the last
  `window` accepted losses (population std), once at least `min_steps` were accepted.

  The floor keeps a nearly flat window from calling ordinary noise a spike; window 0 = never.
  """
  if window <= 0:
    return jnp.zeros((), bool)
  n = jnp.minimum(count, window)
  valid = jnp.arange(window) < n
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, losses, 0.0)) / nf
  std = jnp.sqrt(jnp.sum(jnp.where(valid, (losses - mean) ** 2, 0.0)) / nf)
  std = jnp.maximum(std, std_floor * jnp.abs(mean))
  return finite & (count >= min_steps) & (loss > mean + k * std)


def skip_bad_updates(inner: optax.GradientTransformation, *, window: int = 0, k: float = 6.0,
                     min_steps: int = 20, std_floor: float = 0.1
                     ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner`: an update is dropped (zero updates, inner state kept bit for bit) when the
  loss, the gradient norm or the updated params are not finite, or the loss is a spike (judge).

  Updated params are checked too: a finite loss and gradient can still give inf/NaN params
  (lr=1e38). Only accepted losses enter the history.
  """
  window = int(window)

  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return LossGuardState(inner.init(params), jnp.zeros((max(1, window),), jnp.float32),
                          zero, zero, zero, zero, zero, zero)

  def update(grads, state: LossGuardState, params=None, *, loss, **extra):
    del extra
    updates, inner_state = inner.update(grads, state.inner_state, params)
    loss = jnp.asarray(loss, jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(_global_norm(grads))
    if params is not None:
      finite &= _all_finite(jax.tree.map(jnp.add, params, updates))
    spike = judge(state.losses, state.count, loss, finite, window=window, k=k,
                  min_steps=min_steps, std_floor=std_floor)
    ok = finite & ~spike
    losses = state.losses
    if window > 0:
      slot = state.count % window
      losses = losses.at[slot].set(jnp.where(ok, loss, losses[slot]))
    updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), inner_state, state.inner_state)
    in_a_row = jnp.where(ok, 0, state.in_a_row + 1)
    # The 1-based step being judged: every update, accepted or not, is one step.
    step = state.count + state.nonfinite + state.spikes + 1
    first = state.first_nonfinite
    return updates, LossGuardState(
        inner_state, losses, state.count + ok.astype(jnp.int32),
        state.nonfinite + (~finite).astype(jnp.int32), state.spikes + spike.astype(jnp.int32),
        jnp.where((first == 0) & ~finite, step, first), in_a_row,
        jnp.maximum(state.most_in_a_row, in_a_row))

  return optax.GradientTransformationExtraArgs(init, update)


def find(opt_state: Any) -> LossGuardState:
  """The loss guard's state inside an optimizer state (wrappers around it included)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LossGuardState))
           if isinstance(s, LossGuardState)]
  if len(found) != 1:
    raise ValueError(f"expected one LossGuardState in the optimizer state, found {len(found)}")
  return found[0]


def status(opt_state: Any) -> tuple[int, int, int, int]:
  """(non-finite skips, spike skips, first non-finite step, longest run of consecutive skips)."""
  g = find(opt_state)  # only the counters come to the host, not the inner state
  return tuple(int(x) for x in jax.device_get(  # type: ignore[return-value]
      (g.nonfinite, g.spikes, g.first_nonfinite, g.most_in_a_row)))


def from_config(config: Any, tx: optax.GradientTransformation
                ) -> optax.GradientTransformationExtraArgs:
  """`tx` wrapped in the guard of config.spike_skip (non-finite updates are always dropped)."""
  spike = dict(config.get("spike_skip", None) or {})
  return skip_bad_updates(tx, window=int(spike.get("window", 0)), k=float(spike.get("k", 6.0)),
                          min_steps=int(spike.get("min_steps", 20)),
                          std_floor=float(spike.get("std_floor", 0.1)))
