"""Non-finite losses and loss spikes: 'skip' leaves params and optimizer state bit-for-bit
unchanged (inside the jitted step), the spike rule matches a NumPy rolling mean + k*std, and
'stop' ends the run with exit 1, metrics written and no checkpoint after the bad step."""

import os

import jax
import numpy as np

from conftest import COMMON, ROOT, TINY, steps_on_disk, tiny_config
from helpers import metric_rows
import fault_entry

from big_vision_lite import build, loss_guard, sharding, train, train_step
from big_vision_lite.data import pipeline


def _steps(config, n, fault, monkeypatch):
  monkeypatch.setattr(loss_guard, "from_config", fault_entry.poison_optimizer(fault_entry.parse(fault)))
  setup = build.build(config)
  step_fn = train_step.make_train_step(setup, 1)
  it = pipeline.make_train_iterator(config.input.data, config.input.pp, global_batch_size=16, seed=0)
  state = setup.init_state(jax.random.PRNGKey(0))
  history = []
  with jax.set_mesh(setup.mesh):
    for _ in range(n):
      before = _params_and_optimizer_state(state)
      state, m = step_fn(state, sharding.global_batch(next(it), setup.mesh))
      after = _params_and_optimizer_state(state)
      history.append((before, after, jax.device_get(m)))
  return history, jax.device_get(loss_guard.find(state["opt_state"]))


def _params_and_optimizer_state(state):
  """The params and the wrapped optimizer's own state (the guard's counters aside)."""
  return jax.device_get((state["params"], loss_guard.find(state["opt_state"]).inner_state))


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nan_skip_and_spike_rule_match_numpy(monkeypatch):
  window, k, min_steps, floor = 3, 2.0, 2, 0.1
  config = tiny_config("--config.nan_policy=skip", f"--config.spike_skip.window={window}",
                       f"--config.spike_skip.k={k}", f"--config.spike_skip.min_steps={min_steps}",
                       f"--config.spike_skip.std_floor={floor}")
  history, guard = _steps(config, 7, "nan@2,spike@5", monkeypatch)
  accepted, want_spikes = [], 0
  for i, (before, after, m) in enumerate(history, start=1):
    # The loss the guard saw: the model's, poisoned by the injected faults (fault_entry.py).
    loss = float(m["loss"]) * {2: np.nan, 5: 100.0}.get(i, 1.0)
    if not np.isfinite(loss):
      ok = False
    else:
      recent = np.array(accepted[-window:], np.float32)
      spike = len(accepted) >= min_steps and loss > recent.mean() + k * max(recent.std(), floor * abs(recent.mean()))
      want_spikes += spike
      ok = not spike
    if ok:
      accepted.append(loss)
    assert _same(before, after) == (not ok), f"step {i}: update applied={not _same(before, after)}, want {ok}"
    assert int(m["skipped_nonfinite"]) == (1 if i >= 2 else 0)
  assert int(guard.nonfinite) == 1 and int(guard.first_nonfinite) == 2
  assert int(guard.spikes) == want_spikes >= 1  # at least the injected x100 loss of step 5
  assert int(guard.count) == len(accepted)


def test_nan_stop_exits_1_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(loss_guard, "from_config", fault_entry.poison_optimizer([("nan", 5)]))
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(tmp_path), *COMMON,
                     "--config.log_training_steps=4"])
  err = capsys.readouterr().err
  assert code == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: loss, gradient or updated params not finite at step 5 (nan_policy='stop'); "
                         "stopped at step 6")
  assert "the last complete checkpoint is step 4" in last
  assert steps_on_disk(tmp_path)[-1] == 4  # no checkpoint of step 6 (after the bad step)
  rows = metric_rows(tmp_path)
  assert [r["step"] for r in rows if "loss" in r][-1] == 6 and rows[-1]["skipped_nonfinite"] == 1
