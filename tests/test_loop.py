"""The loop calls each hook after the steps it is due at, in order, and closes every hook; the loss
guard as an optax wrapper drops bad updates with its counters in the optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_vision_lite import loss_guard
from big_vision_lite.hooks import Hook
from big_vision_lite.loop import Loop


def _loop(total=7):
  return Loop(lambda state, batch: (state + batch, {"loss": float(state)}), total)


def test_hooks_run_when_due_in_order_and_close():
  loop, seen = _loop(), []
  loop.add_hook(lambda info: seen.append(("a", info.step)), every=3)
  loop.add_hook(lambda info: seen.append(("b", info.step)), every=0)  # the last step only
  loop.add_hook(lambda info: seen.append(("c", info.step, info.batch)), every=lambda s: s == 2)

  class Closing:
    closed = False

    def __call__(self, info):
      pass

    def close(self):
      Closing.closed = True
  loop.add_hook(Closing())
  state = loop.run(0, 0, lambda step, state: step)
  assert state == sum(range(1, 8))
  assert seen == [("c", 2, 2), ("a", 3), ("a", 6), ("a", 7), ("b", 7)]
  assert Closing.closed


def test_resumed_run_starts_after_its_step_and_a_failing_hook_still_closes():
  loop, steps = _loop(), []
  loop.add_hook(lambda info: steps.append(info.step))
  closed = []
  loop.add_hook(Hook(lambda info: (_ for _ in ()).throw(RuntimeError("stop")) if info.step == 6 else None))
  loop.hooks[-1].fn.close = lambda: closed.append(True)  # type: ignore[attr-defined]
  with pytest.raises(RuntimeError):
    loop.run(0, 4, lambda step, state: 1)
  assert steps == [5, 6] and closed


def test_guard_drops_bad_updates_and_counts_them_in_the_optimizer_state():
  params = {"w": jnp.ones(3)}
  tx = loss_guard.skip_bad_updates(optax.adam(0.1), window=3, k=2.0, min_steps=2, std_floor=0.0)
  state = tx.init(params)
  losses = [1.0, 1.1, np.nan, 0.9, 50.0, 1.0]
  grads = {"w": jnp.full(3, 0.5)}
  history, applied = [], []
  for loss in losses:
    before = state.inner_state
    updates, state = tx.update(grads, state, params, loss=jnp.float32(loss))
    applied.append(bool(np.any(np.asarray(updates["w"]) != 0)))
    if not applied[-1]:
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(state.inner_state)))
    history.append(loss)
  # NaN at 3 and the spike at 5 (mean 1.0 + 2 * std of [1.0, 1.1, 0.9]) are dropped.
  assert applied == [True, True, False, True, False, True]
  g = loss_guard.find({"wrapped": state})
  assert (int(g.nonfinite), int(g.spikes), int(g.first_nonfinite), int(g.count)) == (1, 1, 3, 4)
  assert loss_guard.status(state) == (1, 1, 3, 1)


def test_guard_drops_an_update_that_makes_params_non_finite():
  params = {"w": jnp.ones(2)}
  tx = loss_guard.skip_bad_updates(optax.sgd(1e38), window=0)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.full(2, 1e4)}, state, params, loss=jnp.float32(1.0))
  assert np.array_equal(updates["w"], np.zeros(2)) and int(state.nonfinite) == 1


def test_judge_matches_numpy():
  hist = np.array([1.0, 1.2, 0.8, 1.1], np.float32)
  for loss, floor in ((1.5, 0.0), (1.3, 0.0), (1.3, 0.5), (9.0, 0.5)):
    want = loss > hist.mean() + 3.0 * max(hist.std(), floor * abs(hist.mean()))
    got = loss_guard.judge(jnp.asarray(hist), jnp.int32(4), jnp.float32(loss), jnp.bool_(True),
                           window=4, k=3.0, min_steps=2, std_floor=floor)
    assert bool(got) == want, (loss, floor)
