"""Test-only entry point: the trainer's own main() with faults injected, for the fault tests.

    python tests/fault_entry.py kind@N[,kind@N...] <the trainer's arguments>

kill@N / term@N: this process sends itself SIGKILL / SIGTERM right after step N's checkpoint save
was issued (so a kill can land while an async write is in flight; a term is seen by the same
step's preemption check); slow@N: each step from N on takes 0.5 s more, like a real step's length;
nan@N / spike@N: step N's loss and gradients are multiplied by NaN / 100 inside the jitted step,
ahead of the loss guard. '-' injects nothing. Everything else is `python -m big_vision_lite.train`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, NamedTuple

if __name__ == "__mp_main__":  # a spawned input worker imports this module: signals are the trainer's
  from big_vision_lite import signals as _signals
  _signals.ignore_in_worker()

KINDS = ("kill", "term", "nan", "spike", "slow")
SLOW_STEP_S = 0.5


def parse(spec: str) -> list[tuple[str, int]]:
  """'kill@3,nan@5' -> [('kill', 3), ('nan', 5)]; '-' or '' -> []."""
  out = []
  for item in spec.split(","):
    item = item.strip()
    if item and item != "-":
      kind, _, at = item.partition("@")
      if kind not in KINDS or not at.isdigit():
        raise ValueError(f"fault {item!r}: expected kind@step with kind in {KINDS}")
      out.append((kind, int(at)))
  return out


class PoisonState(NamedTuple):
  count: Any  # updates so far: the step being taken is count + 1
  inner_state: Any


def poisoned(tx, nan_at: list[int], spike_at: list[int]):
  """`tx` (the loss-guarded optimizer) seeing the loss and grads of steps `nan_at` times NaN and
  of `spike_at` times 100, as a diverging model would hand them to it."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def init(params):
    return PoisonState(jnp.zeros((), jnp.int32), tx.init(params))

  def update(grads, state, params=None, *, loss, **extra):
    step = state.count + 1
    factor = (jnp.where(jnp.isin(step, jnp.array(nan_at or [-1])), jnp.nan, 1.0)
              * jnp.where(jnp.isin(step, jnp.array(spike_at or [-1])), 100.0, 1.0))
    grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    updates, inner = tx.update(grads, state.inner_state, params, loss=loss * factor, **extra)
    return updates, PoisonState(state.count + 1, inner)

  return optax.GradientTransformationExtraArgs(init, update)


def poison_optimizer(faults: list[tuple[str, int]]):
  """A replacement for loss_guard.from_config that poisons the steps of nan@N / spike@N."""
  from big_vision_lite import loss_guard  # pylint: disable=import-outside-toplevel
  nan_at = [at for kind, at in faults if kind == "nan"]
  spike_at = [at for kind, at in faults if kind == "spike"]
  original = loss_guard.from_config

  def from_config(config, tx):
    return poisoned(original(config, tx), nan_at, spike_at)
  return from_config


class SignalsAndDelays:
  """The hook of kill@N / term@N / slow@N (run after the checkpoint save of each step)."""

  def __init__(self, faults: list[tuple[str, int]]):
    self.faults = faults

  def __call__(self, info) -> None:
    for kind, at in self.faults:
      if at == info.step and kind in ("kill", "term"):
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind])
      if kind == "slow" and info.step >= at:
        time.sleep(SLOW_STEP_S)


def install(spec: str) -> list:
  """Installs the step faults of `spec`; returns the hooks to pass to train.main."""
  from big_vision_lite import loss_guard  # pylint: disable=import-outside-toplevel
  faults = parse(spec)
  if any(kind in ("nan", "spike") for kind, _ in faults):
    loss_guard.from_config = poison_optimizer(faults)
  return [SignalsAndDelays(faults)] if any(k in ("kill", "term", "slow") for k, _ in faults) else []


def main() -> int:
  spec = sys.argv[1]
  # The trainer reads its arguments from sys.argv (its printed resume command included).
  sys.argv = [sys.argv[0], *sys.argv[2:]]
  from big_vision_lite import signals  # pylint: disable=import-outside-toplevel (light: no JAX)
  signals.install(sys.argv[1:])  # as train.py does first thing
  from big_vision_lite import train  # pylint: disable=import-outside-toplevel
  return train.main(hooks=install(spec))


if __name__ == "__main__":
  sys.exit(main())
