"""SigLIP 2's late self-distillation phase on a two_towers_decoder: its config, the EMA teacher's
state, and the SILC + TIPS loss terms of one step (the math is in self_distill.py).

As SigLIP 2 (Tschannen et al. 2025, Sec. 2.3) describes it: the two losses are added at 80% of
training (`start_fraction`); the teacher (image tower and heads) is initialised from the student
then and follows it as an EMA; the student sees `local_crops` local views (SILC; SigLIP 2 uses 8)
and, separately, the full image with half of its patches masked (TIPS); the teacher sees the full
image. SigLIP and LocCa losses keep using the original image. Loss weights: 1 (local-to-global)
and 0.25 (masked prediction), times a model-size factor (0.25 for B, 0.5 L, 1.0 So400m, 0.5 g),
here `weight`.

Everything is decided inside the jitted step from the step counter: before the start step the
extra losses are skipped (a lax.cond: no compute, no recompile at the switch) and the step is the
plain SigLIP 2 step; crops and masks come from the step's rng, so a resumed run draws the same.
The state (`task_state` of the train state): teacher {img, distill_global, distill_patch},
the two DINO centres, and `ready` (0 until the first step of the phase, which takes the teacher
from the student; a checkpoint without a task state restores with zeros and does the same).

Departures from the paper: the heads and the mask token exist from step 0 (the state's layout
never changes) and get no gradient before the switch, where the paper creates them, with their
optimizer state, at the switch; Adam's moments of a never-updated parameter stay zero, but its bias
correction counts from step 0, and weight decay shrinks them meanwhile. SILC's global views are
crops of 0.4 to 1.0 of the image; here the teacher sees the full image. Crops are square.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from big_vision_lite import self_distill as sd
from big_vision_lite.config import ConfigError

TEACHER_KEYS = ("img", "distill_global", "distill_patch")
_RNG_SALT = 0x5D  # folded into the step's rng: the dropout rng of the other losses stays as it is


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.task.self_distill. Temperatures and the centre momentum are DINO's defaults
  (Caron et al. 2021); SILC keeps the EMA momentum fixed (it does not anneal it to 1)."""
  start_fraction: float = 0.8
  weight: float = 1.0  # the paper's model-size factor on both terms
  local_weight: float = 1.0
  masked_weight: float = 0.25
  local_crops: int = 8
  local_res: int = 0  # 0: half the image side, rounded down to the patch size
  local_scale: tuple[float, float] = (0.05, 0.4)
  mask_ratio: float = 0.5
  student_temp: float = 0.1
  teacher_temp: float = 0.04
  ema: float = 0.996
  center_momentum: float = 0.9


def settings_from_config(cfg: Any, patch: int) -> Settings:
  """Settings from config.task.self_distill (a dict); one-line ConfigErrors name the key."""
  where = "config.task.self_distill"
  cfg = dict(cfg)
  names = [f.name for f in dataclasses.fields(Settings)]
  unknown = sorted(set(cfg) - set(names))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(names)})")
  try:
    kw = {k: (tuple(float(x) for x in v) if k == "local_scale" else
              int(v) if k in ("local_crops", "local_res") else float(v)) for k, v in cfg.items()}
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None
  s = Settings(**kw)
  checks = [
      ("start_fraction", 0.0 <= s.start_fraction <= 1.0, "in [0, 1]"),
      ("weight", s.weight >= 0, ">= 0"), ("local_weight", s.local_weight >= 0, ">= 0"),
      ("masked_weight", s.masked_weight >= 0, ">= 0"),
      ("local_crops", s.local_crops >= 1, ">= 1"),
      ("local_res", s.local_res >= 0 and s.local_res % patch == 0,
       f"0 (half the image) or a multiple of the patch size {patch}"),
      ("local_scale", len(s.local_scale) == 2 and 0 < s.local_scale[0] <= s.local_scale[1] <= 1,
       "(lo, hi) with 0 < lo <= hi <= 1"),
      ("mask_ratio", 0.0 < s.mask_ratio < 1.0, "in (0, 1)"),
      ("student_temp", s.student_temp > 0, "> 0"), ("teacher_temp", s.teacher_temp > 0, "> 0"),
      ("ema", 0.0 <= s.ema < 1.0, "in [0, 1)"),
      ("center_momentum", 0.0 <= s.center_momentum < 1.0, "in [0, 1)"),
  ]
  for key, ok, want in checks:
    if not ok:
      raise ConfigError(f"{where}.{key}: {getattr(s, key)!r}; it must be {want}")
  return s


def teacher_of(params: Any) -> dict:
  return {k: params[k] for k in TEACHER_KEYS}


class Phase:
  """The phase for one run: `model` a two_towers_decoder with `distill` heads."""

  def __init__(self, settings: Settings, model: Any, patch: int, image_key: str):
    self.s = settings
    self.model = model
    self.patch = patch
    self.image_key = image_key
    self.start_step: int | None = None

  def init_state(self, params: Any, total_steps: int) -> dict:
    self.start_step = int(self.s.start_fraction * total_steps)
    k = params["distill_global"]["prototypes"].shape[-1]
    zeros = lambda: jnp.zeros((k,), jnp.float32)
    return {"teacher": jax.tree.map(jnp.zeros_like, teacher_of(params)),
            "center_global": zeros(), "center_patch": zeros(), "ready": jnp.zeros((), jnp.int32)}

  def state_shardings(self, params_sh: Any, repl: Any) -> dict:
    return {"teacher": teacher_of(params_sh), "center_global": repl, "center_patch": repl,
            "ready": repl}

  def is_on(self, step: jax.Array) -> jax.Array:
    if self.start_step is None:
      raise RuntimeError("self-distillation: init_state (which learns the total steps) not called")
    return step >= self.start_step

  def effective_teacher(self, task_state: dict, params: Any) -> dict:
    """The stored teacher, or the student's own weights at the phase's first step."""
    student = jax.lax.stop_gradient(teacher_of(params))
    ready = task_state["ready"] > 0
    return jax.tree.map(lambda t, s: jnp.where(ready, t, s), task_state["teacher"], student)

  def local_res(self, image_side: int) -> int:
    return self.s.local_res or max(self.patch, (image_side // 2) // self.patch * self.patch)

  def losses(self, params: Any, batch: Any, rng: jax.Array, task_state: dict,
             step: jax.Array) -> tuple[jax.Array, dict, dict]:
    """(weighted extra loss, metrics, stats for update_state); zeros before the phase."""
    images = batch[self.image_key]
    k = params["distill_global"]["prototypes"].shape[-1]

    def on(params):
      s = self.s
      rng_sd = jax.random.fold_in(rng, _RNG_SALT)
      k_crop, k_mask, k_drop = jax.random.split(rng_sd, 3)
      teacher = {**jax.lax.stop_gradient(params), **self.effective_teacher(task_state, params)}
      t_out = self.model.apply({"params": teacher}, images, distill=True, train=False)
      b = images.shape[0]
      size = self.local_res(images.shape[1])
      crops = sd.local_crops(k_crop, images, s.local_crops, size, s.local_scale)
      crops = crops.reshape((b * s.local_crops,) + crops.shape[2:])
      s_local = self.model.apply({"params": params}, crops, distill=True, train=True,
                                 rngs={"dropout": k_drop})["distill/global"]
      l_local = sd.local_to_global_loss(
          s_local.reshape(b, s.local_crops, -1), t_out["distill/global"],
          task_state["center_global"], student_temp=s.student_temp, teacher_temp=s.teacher_temp)
      num_patches = t_out["distill/patch"].shape[1]
      mask = sd.random_patch_mask(k_mask, b, num_patches, s.mask_ratio)
      s_patch = self.model.apply({"params": params}, images, distill=True, patch_mask=mask,
                                 train=True, rngs={"dropout": k_drop})["distill/patch"]
      l_masked = sd.masked_prediction_loss(
          s_patch, t_out["distill/patch"], mask, task_state["center_patch"],
          student_temp=s.student_temp, teacher_temp=s.teacher_temp)
      total = s.weight * (s.local_weight * l_local + s.masked_weight * l_masked)
      stats = {"center_global": jnp.mean(t_out["distill/global"].astype(jnp.float32), axis=0),
               "center_patch": jnp.mean(t_out["distill/patch"].astype(jnp.float32), axis=(0, 1))}
      return total, {"loss_local": l_local, "loss_masked": l_masked}, stats

    def off(params):
      del params
      z = jnp.zeros((), jnp.float32)
      return z, {"loss_local": z, "loss_masked": z}, {"center_global": jnp.zeros((k,)),
                                                       "center_patch": jnp.zeros((k,))}

    total, metrics, stats = jax.lax.cond(self.is_on(step), on, off, params)
    metrics["self_distill"] = self.is_on(step).astype(jnp.float32)
    return total, metrics, stats

  def update_state(self, task_state: dict, stats: dict, params: Any, new_params: Any,
                   step: jax.Array) -> dict:
    """After the step's update: the teacher's EMA toward the updated student (from the student
    itself at the phase's first step) and the centres' EMA; unchanged before the phase."""
    teacher = sd.ema(self.effective_teacher(task_state, params),
                     jax.lax.stop_gradient(teacher_of(new_params)), self.s.ema)
    centre = lambda k: sd.center_update(task_state[k], stats[k], self.s.center_momentum)
    new = {"teacher": teacher, "center_global": centre("center_global"),
           "center_patch": centre("center_patch"), "ready": jnp.ones((), jnp.int32)}
    on = self.is_on(step)
    return jax.tree.map(lambda n, o: jnp.where(on, n, o), new, task_state)
