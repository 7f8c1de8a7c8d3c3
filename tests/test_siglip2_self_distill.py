"""SigLIP 2's self-distillation: the SILC and TIPS losses, centre, EMA, masks and crops against
NumPy; the late-phase switch of the shipped config (before it the plain SigLIP 2 step, from it
the new losses and a teacher taken from the student); its config errors; and, through the CLI, a
kill inside the phase resumes to the bitwise-same params and teacher."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, assert_bitwise_equal, final_params, metric_rows, run_cli

from big_vision_lite import build, config as config_lib, self_distill as sd, train, train_step

F32 = np.finfo(np.float32).eps


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_local_to_global_loss_matches_numpy_dino_formula():
  rng = np.random.default_rng(0)
  b, n, k = 3, 4, 7
  s, t, c = rng.normal(size=(b, n, k)), rng.normal(size=(b, k)), rng.normal(size=(k,))
  want = 0.0
  for i in range(b):
    p = _np_softmax((t[i] - c) / 0.04)
    for j in range(n):
      want += -np.sum(p * _np_log_softmax(s[i, j] / 0.1))
  want /= b * n
  got = sd.local_to_global_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c),
                                student_temp=0.1, teacher_temp=0.04)
  np.testing.assert_allclose(float(got), want, rtol=100 * F32 * k)


def test_masked_prediction_loss_matches_numpy_at_masked_patches_only():
  rng = np.random.default_rng(1)
  b, p, k = 2, 6, 5
  s, t, c = rng.normal(size=(b, p, k)), rng.normal(size=(b, p, k)), rng.normal(size=(k,))
  mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], bool)
  per_image = []
  for i in range(b):
    ce = [-np.sum(_np_softmax((t[i, j] - c) / 0.05) * _np_log_softmax(s[i, j] / 0.2))
          for j in range(p) if mask[i, j]]
    per_image.append(np.mean(ce))
  got = sd.masked_prediction_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), jnp.asarray(c),
                                  student_temp=0.2, teacher_temp=0.05)
  np.testing.assert_allclose(float(got), np.mean(per_image), rtol=100 * F32 * k)
  # Unmasked positions do not count: changing the student there changes nothing.
  s2 = np.where(mask[..., None], s, 0.0)
  got2 = sd.masked_prediction_loss(jnp.asarray(s2), jnp.asarray(t), jnp.asarray(mask),
                                   jnp.asarray(c), student_temp=0.2, teacher_temp=0.05)
  assert float(got2) == float(got)


def test_teacher_targets_carry_no_gradient():
  t = jnp.ones((2, 3))
  g = jax.grad(lambda t: sd.local_to_global_loss(jnp.zeros((2, 1, 3)), t, jnp.zeros(3),
                                                 student_temp=0.1, teacher_temp=0.04))(t)
  assert not np.any(np.asarray(g))


def test_center_and_ema_updates_match_numpy():
  c, mean = np.arange(4.0), np.full(4, 10.0)
  np.testing.assert_allclose(np.asarray(sd.center_update(jnp.asarray(c), jnp.asarray(mean), 0.9)),
                             0.9 * c + 0.1 * mean, rtol=4 * F32)
  teacher = {"a": jnp.ones((2,)), "b": {"c": jnp.zeros((3,))}}
  student = {"a": jnp.zeros((2,)), "b": {"c": jnp.full((3,), 2.0)}}
  out = sd.ema(teacher, student, 0.75)
  np.testing.assert_allclose(np.asarray(out["a"]), 0.75, rtol=F32)
  np.testing.assert_allclose(np.asarray(out["b"]["c"]), 0.5, rtol=F32)


def test_patch_mask_has_the_ratio_in_every_row_and_depends_on_the_key():
  m = np.asarray(sd.random_patch_mask(jax.random.PRNGKey(0), 5, 16, 0.5))
  assert m.shape == (5, 16) and (m.sum(axis=1) == 8).all()
  assert len({row.tobytes() for row in m}) > 1
  again = np.asarray(sd.random_patch_mask(jax.random.PRNGKey(0), 5, 16, 0.5))
  other = np.asarray(sd.random_patch_mask(jax.random.PRNGKey(1), 5, 16, 0.5))
  assert (m == again).all() and not (m == other).all()


def test_local_crops_sample_the_drawn_box():
  h = w = 32
  # A ramp image: the value is the row coordinate, so a bilinear crop reads its box's rows.
  yy = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None, None], (h, w, 1))
  images = jnp.asarray(np.stack([yy, yy + 100.0]))
  rng = jax.random.PRNGKey(3)
  size, scale = 8, (0.1, 0.4)
  crops = np.asarray(sd.local_crops(rng, images, 3, size, scale))
  boxes = np.asarray(sd.local_crop_boxes(rng, 2, 3, scale))
  assert crops.shape == (2, 3, size, size, 1)
  area = boxes[..., 2] * boxes[..., 3]
  assert ((area >= scale[0] - 1e-6) & (area <= scale[1] + 1e-6)).all()
  assert ((boxes[..., :2] >= 0) & (boxes[..., :2] + boxes[..., 2:] <= 1 + 1e-6)).all()
  for i in range(2):
    for j in range(3):
      y0, side = boxes[i, j, 0] * h, boxes[i, j, 2] * h
      # Output row o's centre samples input coordinate x_o = y0 + (o + 0.5) * side / size; an
      # antialiased bilinear (triangle) kernel of width max(side / size, 1) weighs input row r
      # (centre r + 0.5) inside the image, normalised; the ramp's value of row r is r.
      x = y0 + (np.arange(size) + 0.5) * side / size
      width = max(side / size, 1.0)
      wts = np.clip(1 - np.abs((np.arange(h)[None] + 0.5 - x[:, None]) / width), 0, None)
      want = (wts * np.arange(h)[None]).sum(1) / wts.sum(1) + 100.0 * i
      np.testing.assert_allclose(crops[i, j, :, size // 2, 0], want, rtol=1e-5)


# ------------------------------------------------------------------- the shipped config

TINY = ("configs/siglip2_shapes.py:res=32,width=16,depth=1,dec_depth=1,heads=2,patch=8,batch=8,"
        "steps=4,workers=0,local_crops=2,prototypes=32,sd_start={start}")


def _setup(start: float):
  config = config_lib.load_config(os.path.join(ROOT, TINY.format(start=start)))
  config = config_lib.apply_overrides(config, ["--config.schedule.warmup_steps=1",
                                               "--config.lr=0.01"])
  setup = build.build(config)
  return setup, train_step.make_train_step(setup, 1)


@pytest.fixture(scope="module")
def switch_runs():
  """Steps 0..3 of the shipped config with the phase from step 2 (0.5 of 4) and without it."""
  runs = {}
  for start in (0.5, 1.0):
    setup, step_fn = _setup(start)
    state = setup.init_state(jax.random.PRNGKey(0))
    batch = {k: np.repeat(v, 8, 0) for k, v in setup.example.items()}
    # Vary the examples so the crops and masks have something to see.
    scale = np.linspace(0.5, 1.0, 8, dtype=np.float32)[:, None, None, None]
    batch["image"] = batch["image"] * scale
    history = []
    for _ in range(4):
      before = jax.device_get(state)
      state, metrics = step_fn(state, batch)
      history.append((before, jax.device_get(metrics)))
    runs[start] = (history, jax.device_get(state))
  return runs


@pytest.mark.slow  # two compiles of the SigLIP 2 step: minutes on 2 loaded cores
@pytest.mark.extended  # CI's check of the switch is the kill test's metrics below
def test_before_the_switch_the_step_is_the_plain_siglip2_step(switch_runs):
  (with_sd, _), (without, _) = switch_runs[0.5], switch_runs[1.0]
  for step in (0, 1, 2):  # the states entering steps 0..2: updated by steps < 2 only
    a, b = with_sd[step][0]["params"], without[step][0]["params"]
    assert "distill_global" in a and "distill_global" not in b
    for name in b:
      for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
        # The same math in two XLA programs (fusion may order fp32 sums differently): a few
        # ulps of each of the `step` Adam updates, each at most about lr = 0.01 in size.
        np.testing.assert_allclose(x, y, rtol=16 * F32, atol=16 * F32 * 0.01 * step,
                                   err_msg=f"{name} at step {step}")
  for step in (0, 1):
    m = with_sd[step][1]
    assert m["self_distill"] == 0 and m["loss_local"] == 0 and m["loss_masked"] == 0
    np.testing.assert_allclose(m["loss"], without[step][1]["loss"], rtol=16 * F32)
    assert "task_state_stats" not in m


@pytest.mark.slow  # shares the fixture above
@pytest.mark.extended
def test_from_the_switch_the_losses_appear_and_the_teacher_starts_as_the_student(switch_runs):
  history, final = switch_runs[0.5]
  assert int(history[2][0]["task_state"]["ready"]) == 0
  for step in (2, 3):
    m = history[step][1]
    assert m["self_distill"] == 1 and np.isfinite(m["loss"])
    assert m["loss_local"] > 0 and m["loss_masked"] > 0
    plain = m["loss_contrastive"] + m["loss_decoder"]
    extra = 0.25 * (m["loss_local"] + 0.25 * m["loss_masked"])
    np.testing.assert_allclose(m["loss"], plain + extra, rtol=10 * F32)
  # After the first step of the phase: teacher = ema(student before it, student after it).
  before, after = history[2][0]["params"], history[3][0]["params"]
  teacher = history[3][0]["task_state"]["teacher"]
  for name in teacher:
    for t, s0, s1 in zip(jax.tree.leaves(teacher[name]), jax.tree.leaves(before[name]),
                         jax.tree.leaves(after[name])):
      np.testing.assert_allclose(t, 0.996 * s0 + 0.004 * s1, rtol=4 * F32,
                                 atol=4 * F32 * np.abs(s0).max())
  assert int(final["task_state"]["ready"]) == 1
  assert np.any(final["task_state"]["center_global"] != 0)
  # Before the phase the state is untouched.
  assert not np.any(history[2][0]["task_state"]["center_patch"])


@pytest.mark.parametrize("key,value,match", [
    ("mask_ratio", "1.5", "config.task.self_distill.mask_ratio: 1.5; it must be in (0, 1)"),
    ("start_fraction", "-0.1",
     "config.task.self_distill.start_fraction: -0.1; it must be in [0, 1]"),
    ("local_res", "12",
     "config.task.self_distill.local_res: 12; it must be 0 (half the image) or a multiple of the "
     "patch size 8"),
    ("mask_ration", "0.5", "config.task.self_distill.mask_ration: unknown key"),
])
def test_bad_self_distill_values_are_one_line_errors(key, value, match, capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY.format(start=0.5)),
                     "--config.evals={}", f"--config.task.self_distill.{key}={value}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert match in err, err


def test_self_distill_without_heads_is_a_config_error(capsys):
  code = train.main(["--config", os.path.join(ROOT, TINY.format(start=0.5)),
                     "--config.evals={}", "--config.model.distill=None"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "config.model.distill: task 'siglip2' with self_distill needs" in err


# --------------------------------------------------------------------- resume through the CLI

CLI_CONFIG = ("configs/siglip2_shapes.py:res=32,width=16,depth=1,dec_depth=1,heads=2,patch=8,"
              "batch=16,steps=8,workers=0,local_crops=2,prototypes=32,sd_start=0.5")
CLI_COMMON = ["--config.evals={}", "--config.log_training_steps=1", "--config.progress=False",
              "--config.schedule.warmup_steps=2", "--config.ckpt_steps=2",
              "--config.input.num_workers=0", "--config.mfu_peak_flops=1e12",
              "--config.profile.num_steps=0"]


def _task_state(workdir) -> dict:
  """The newest checkpoint's task_state arrays, flat name -> array."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from big_vision_lite import checkpoint  # pylint: disable=import-outside-toplevel
  ckpts = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  with warnings.catch_warnings():  # read onto the host: the shardings it warns about do not matter
    warnings.simplefilter("ignore", UserWarning)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(ckpts, str(step), checkpoint.STATE_ITEM))
  flat = checkpoint.flatten_with_names(restored["task_state"])
  return {k: np.asarray(v) for k, v in flat.items()}


@pytest.mark.slow  # compiles the SigLIP 2 step with the phase: minutes on 2 loaded cores
def test_kill_inside_the_phase_resumes_bitwise(tmp_path):
  cache = str(tmp_path / "xla_cache")
  ref = tmp_path / "ref"
  r = run_cli(CLI_CONFIG, CLI_COMMON, ref, compile_cache=cache, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  work = tmp_path / "work"
  # The phase starts at step 4; kill@6 lands right after step 6's save was issued.
  r = run_cli(CLI_CONFIG, CLI_COMMON, work, fault="kill@6", compile_cache=cache, timeout=900)
  assert r.returncode == -9, r.stderr[-3000:]
  r = run_cli(CLI_CONFIG, CLI_COMMON, work, compile_cache=cache, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stdout + r.stderr

  assert_bitwise_equal(final_params(work), final_params(ref))
  teacher, want = _task_state(work), _task_state(ref)
  assert any(k.startswith("teacher/img/") for k in want)
  assert_bitwise_equal(teacher, want)
  assert int(want["ready"]) == 1
  rows = {row["step"]: row for row in metric_rows(work) if "loss" in row}
  ref_rows = {row["step"]: row for row in metric_rows(ref) if "loss" in row}
  for step in (7, 8):
    for key in ("loss", "loss_local", "loss_masked"):
      assert rows[step][key] == ref_rows[step][key], (step, key)
  assert ref_rows[4]["self_distill"] == 0 and ref_rows[5]["self_distill"] == 1


def test_a_checkpoint_without_task_state_restores_with_a_note(tmp_path):
  """A state saved without `task_state` (as the code before it wrote them) restores: the
  teacher state starts at zero (`ready` 0: the phase takes it from the student), with a note."""
  from big_vision_lite import checkpoint, restore  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(os.path.join(ROOT, TINY.format(start=0.5)))
  config = config_lib.apply_overrides(config, ["--config.schedule.warmup_steps=1"])
  setup = build.build(config)
  state = setup.init_state(jax.random.PRNGKey(0))
  assert "task_state" in state
  old = {k: v for k, v in state.items() if k != "task_state"}
  with checkpoint.Checkpointer(str(tmp_path), save_interval_steps=1) as ckpt:
    ckpt.save(3, old, force=True)
    ckpt.wait_until_finished()
    # pylint: disable-next=protected-access
    restored, note = restore._restore_step(ckpt, 3, setup.abstract_state, None)
  assert note is not None and "has no task_state" in note, note
  assert_bitwise_equal(checkpoint.flatten_with_names(jax.device_get(restored["params"])),
                       checkpoint.flatten_with_names(jax.device_get(state["params"])))
  ts = jax.device_get(restored["task_state"])
  assert int(ts["ready"]) == 0 and not any(np.any(x) for x in jax.tree.leaves(ts))
