"""No NaN parameters are ever saved: updates that make params non-finite are dropped, a run of
skipped updates stops the run, the spike rule has a floor on its std, and lr=inf is refused."""

import os

import jax
import numpy as np

from conftest import COMMON, ROOT, TINY, steps_on_disk, tiny_config
from helpers import final_params

from big_vision_lite import build, loss_guard, sharding, train, train_step
from big_vision_lite.data import pipeline


def _run_steps(config, n):
  setup = build.build(config)
  step_fn = train_step.make_train_step(setup, 1)
  it = pipeline.make_train_iterator(config.input.data, config.input.pp, global_batch_size=16, seed=0)
  state = setup.init_state(jax.random.PRNGKey(0))
  before = jax.device_get(state["params"])
  with jax.set_mesh(setup.mesh):
    for _ in range(n):
      state, _ = step_fn(state, sharding.global_batch(next(it), setup.mesh))
  return before, jax.device_get(state["params"]), jax.device_get(loss_guard.find(state["opt_state"]))


def test_update_to_nonfinite_params_is_dropped():
  # Finite loss and gradient at step 1, but lr=inf makes every updated parameter inf/NaN.
  before, after, guard = _run_steps(tiny_config("--config.lr=inf", "--config.nan_policy=skip"), 2)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(a, b)
  assert int(guard.nonfinite) == 2 and int(guard.most_in_a_row) == 2


def test_spike_floor_keeps_ordinary_updates():
  # Window 4, k=3 without a floor called most ordinary updates of this run spikes.
  config = tiny_config("--config.nan_policy=skip", "--config.spike_skip.window=4",
                       "--config.spike_skip.k=3.0", "--config.spike_skip.min_steps=3", "--config.total_steps=20")
  _, _, guard = _run_steps(config, 20)
  assert int(guard.spikes) <= 1, int(guard.spikes)


def test_consecutive_skips_stop_the_run_and_saved_params_are_finite(tmp_path, capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(tmp_path), *COMMON,
                     "--config.lr=1e30", "--config.nan_policy=skip", "--config.max_consecutive_skips=3"])
  err = capsys.readouterr().err
  assert code == 1, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: 4 updates in a row were skipped by step"), last
  assert "config.max_consecutive_skips=3" in last and "Traceback" not in err
  for step in steps_on_disk(tmp_path):
    params = final_params(tmp_path, step)
    assert all(np.isfinite(v).all() for v in params.values()), step


def test_lr_inf_is_a_config_error(tmp_path, capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY), "--workdir", str(tmp_path), *COMMON,
                     "--config.lr=inf"])
  err = capsys.readouterr().err
  assert code == 2
  assert err.strip().splitlines() == ["error: config.lr: must be finite, got inf"]
  assert not os.path.exists(tmp_path / "checkpoints")
