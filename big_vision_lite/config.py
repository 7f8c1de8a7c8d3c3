"""Training configs: load `path.py:arg` files, apply `--config.key=value` overrides, validate.

Every config is merged onto `defaults()`, which is the schema: a key the schema
does not know, or a value of the wrong type, is a one-line `ConfigError` that
names the key, raised before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections

from big_vision_lite import config_errors

ConfigDict = ml_collections.ConfigDict


ConfigError = config_errors.ConfigError  # defined without ml_collections, raised here too


# Sub-dicts whose contents belong to a component (a model, a task, an evaluator)
# and are validated by that component, not by the schema here.
_FREE_FORM = ("model", "task", "evals", "input.data", "schedule", "optax", "model_load")


def defaults() -> ConfigDict:
  """The schema every config is merged onto, with the default values."""
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 0  # one of total_steps / total_epochs must be set
  c.total_epochs = 0.0

  c.input = ConfigDict()
  c.input.data = ConfigDict(dict(name="bvl_shapes", split="train", data_dir=None, files=None))
  c.input.pp = ""
  c.input.batch_size = 0
  c.input.num_workers = 0
  c.input.prefetch = 16
  # An example whose record or preprocessing fails: 'skip' it (counted, logged) or stop ('error').
  c.input.bad_examples = "skip"
  # The run stops once more than this fraction of the examples read (at least 100 counted) was bad.
  c.input.max_bad_fraction = 0.01

  c.model_name = "vit"
  # The implementation of attention and LayerNorm (big_vision_lite/platform): 'auto' picks per
  # backend and shape (on CPU by a cached measurement), or one of platform.ATTENTION / NORM.
  c.model = ConfigDict(dict(attention_impl="auto", norm_impl="auto"))
  c.model_init = ""  # pretrained weights: one of our workdirs/steps, or a big_vision .npz
  c.model_load = ConfigDict(dict(allow_mismatch=False, subtree=""))

  c.task = ConfigDict(dict(name="classification"))

  c.optax_name = "adamw"
  c.optax = ConfigDict()
  c.lr = 1e-3
  c.wd = 1e-4
  c.wd_mults = [(".*/kernel$", 1.0)]
  c.lr_mults = []
  c.frozen = []
  c.schedule = ConfigDict(dict(warmup_steps=0, decay_type="cosine"))
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  # A non-finite loss or gradient: 'stop' (metrics written, last good checkpoint kept) or
  # 'skip' the update (params and optimizer state untouched, counted in the metrics).
  c.nan_policy = "stop"
  # Skip an update whose loss exceeds mean + k*max(std, std_floor*|mean|) of the last `window`
  # accepted losses, once `min_steps` losses were accepted; window=0 turns it off.
  c.spike_skip = ConfigDict(dict(window=0, k=6.0, min_steps=20, std_floor=0.1))
  # Stop (exit 1) once more than this many updates in a row were skipped (non-finite or spike); 0 = never.
  c.max_consecutive_skips = 10

  # Compiler settings per backend (big_vision_lite/platform): XLA:CPU's dot emitter,
  # 'auto' (measured once per CPU model and width), 'eigen' or 'ynnpack'.
  # Platform settings: the CPU dot emitter (platform/dispatch.py) and the XLA_FLAGS preset for
  # GPU runs, applied before JAX starts (platform/gpu/xla_flags.py; "none" or "gpu_default").
  c.platform = ConfigDict(dict(cpu_dots="auto", xla_flags_preset="gpu_default"))

  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.sharding_rules = [
      ("batch", ("data", "fsdp", "expert")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("classes", "tensor"),
      ("vocab", "tensor"),
      ("exp", "expert"),
      ("layers", None),
      ("length", None),
  ]

  c.evals = ConfigDict()
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  c.keep_ckpts = 3
  c.keep_ckpt_steps = 0  # also keep every N-th step forever; 0 = off
  c.async_checkpoint = True
  c.mfu_peak_flops = 0.0  # per device; 0 = table value or measured CPU probe
  c.progress = True
  # A jax.profiler trace of num_steps steps from start_step into <workdir>/profile; 0 steps = off.
  c.profile = ConfigDict(dict(start_step=10, num_steps=0))
  # Resume a workdir whose config.json differs in more than the keys in RESUMABLE_CHANGES.
  c.allow_config_change = False
  return c


# Keys that may differ between a workdir's saved config.json and a run resuming it
# (prefixes of dotted names): lengths, logging, evaluation, checkpoint cadence, layout.
RESUMABLE_CHANGES = (
    "total_steps", "total_epochs", "evals", "log_training_steps", "progress", "ckpt_steps",
    "keep_ckpts", "keep_ckpt_steps", "async_checkpoint", "mfu_peak_flops", "mesh", "sharding_rules",
    "input.prefetch", "input.bad_examples", "input.max_bad_fraction", "nan_policy", "spike_skip",
    "max_consecutive_skips", "allow_config_change", "profile",
    # Implementations differ by float rounding only; a resume may run on another host.
    "model.attention_impl", "model.norm_impl", "platform",
)


# ----------------------------------------------------------------------------- parsing


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
  """Parses the `:arg` part of `--config file.py:arg` into typed values.

  `spec` gives every allowed key with its default; the default's type decides
  how the string is read, e.g. `parse_arg("variant=B/16,res=224", variant="S/16",
  res=224)`. A bare word `foo` means `foo=True`.
  """
  out = ConfigDict(dict(spec))
  if not arg:
    return out
  for item in _split_top_level(arg):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ConfigError(f"config arg {key!r} is not known{_suggest(key, spec)}; "
                        f"allowed: {', '.join(sorted(spec))}")
    out[key] = _coerce(f"config arg {key}", value.strip() if _ else "True", spec[key])
  return out


def _split_top_level(s: str) -> list[str]:
  """Splits on commas that are not inside brackets or quotes."""
  parts, depth, quote, cur = [], 0, None, []
  for ch in s:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  if cur:
    parts.append("".join(cur))
  return [p for p in parts if p.strip()]


def _coerce(name: str, text: str, like: Any) -> Any:
  """Reads `text` as a value of the type of `like`."""
  try:
    if isinstance(like, bool):
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
    if isinstance(like, str):
      return text
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if like is None:
      return text  # None-default keys take strings verbatim (paths, names)
    raise ConfigError(f"{name}: expected {type(like).__name__}, got {text!r}") from None
  if like is not None and isinstance(like, (list, tuple)) and not isinstance(value, (list, tuple)):
    raise ConfigError(f"{name}: expected a list, got {text!r}")
  return value


def _suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(spec: str) -> ConfigDict:
  """Loads `path/to/config.py[:arg]` (or `recipe_name[:arg]`, a shipped recipe) by calling its
  `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    from big_vision_lite import recipes  # pylint: disable=import-outside-toplevel (imports this module)
    path = recipes.recipe_path(path) or path
    if not os.path.isfile(path):
      raise ConfigError(recipes.missing_config(path))
  module_spec = importlib.util.spec_from_file_location("bvl_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: {path} has no get_config(arg) function")
  user = module.get_config(arg or None)
  if not isinstance(user, ConfigDict):
    raise ConfigError(f"--config: {path}:get_config returned {type(user).__name__}, not ConfigDict")
  return merge_onto_defaults(user)


def merge_onto_defaults(user: ConfigDict) -> ConfigDict:
  """Returns defaults() updated with `user`, rejecting unknown keys and wrong types."""
  merged = defaults()
  _merge(merged, user, "config")
  return merged


def _is_free(name: str) -> bool:
  return name.removeprefix("config.") in _FREE_FORM


def _merge(dst: ConfigDict, src: ConfigDict, prefix: str, free: bool = False) -> None:
  """Copies `src` into `dst`; outside free-form sections every key must already exist."""
  for key, value in src.items():
    name = f"{prefix}.{key}"
    if isinstance(value, dict):
      value = ConfigDict(value)
    if key not in dst:
      if not free:
        raise ConfigError(f"unknown config key {name!r}{_suggest(key, dst.keys())}")
      dst[key] = value
      continue
    current = dst[key]
    if isinstance(current, ConfigDict):
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"{name}: expected a dict, got {value!r}")
      _merge(current, value, name, free or _is_free(name))
      continue
    if not free:
      _check_type(name, current, value)
    dst[key] = value


def _check_type(name: str, current: Any, value: Any) -> None:
  if current is None or value is None:
    return
  if isinstance(current, bool) != isinstance(value, bool):
    raise ConfigError(f"{name}: expected {type(current).__name__}, got {value!r}")
  if isinstance(current, float) and isinstance(value, int):
    return
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return
  if not isinstance(value, type(current)):
    raise ConfigError(f"{name}: expected {type(current).__name__}, got {type(value).__name__} {value!r}")


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `--config.a.b=value` strings; values are read with the existing value's type."""
  for item in overrides:
    body = item[2:] if item.startswith("--") else item
    if not body.startswith("config.") or "=" not in body:
      raise ConfigError(f"cannot read override {item!r}: expected --config.key=value")
    dotted, value = body[len("config."):].split("=", 1)
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
      if part not in node or not isinstance(node[part], ConfigDict):
        known = node.keys() if isinstance(node, ConfigDict) else []
        raise ConfigError(f"unknown config key 'config.{'.'.join(parts[:depth + 1])}'{_suggest(part, known)}")
      node = node[part]
    leaf = parts[-1]
    name = f"config.{dotted}"
    if leaf not in node:
      if not any(_is_free("config." + ".".join(parts[:i])) for i in range(1, len(parts))):
        raise ConfigError(f"unknown config key {name!r}{_suggest(leaf, node.keys())}")
      node[leaf] = _literal_or_str(value)
      continue
    node[leaf] = _coerce(name, value, node[leaf]) if node[leaf] is not None else _literal_or_str(value)
  return config


def _literal_or_str(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


# ----------------------------------------------------------------------------- validation


def check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


def validate(config: ConfigDict, num_devices: int, process_count: int = 1) -> None:
  """Checks values that need no compile: sizes, divisibility, data locations."""
  check(config.total_steps > 0 or config.total_epochs > 0, "total_steps",
        "set total_steps (or total_epochs) to a positive number")
  check(config.input.batch_size > 0, "input.batch_size", f"must be positive, got {config.input.batch_size}")
  check(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
  check(config.input.num_workers >= 0, "input.num_workers", "must be >= 0")
  check(config.log_training_steps > 0, "log_training_steps", "must be positive")
  check(config.ckpt_steps >= 0, "ckpt_steps", "must be >= 0 (0 disables checkpoints)")
  check(config.lr >= 0, "lr", f"must be >= 0, got {config.lr}")
  check(math.isfinite(config.lr), "lr", f"must be finite, got {config.lr}")
  check(math.isfinite(config.wd), "wd", f"must be finite, got {config.wd}")
  check(config.total_steps >= 0, "total_steps", f"must be >= 0, got {config.total_steps}")
  check(config.total_epochs >= 0, "total_epochs", f"must be >= 0, got {config.total_epochs}")
  check(config.wd >= 0, "wd", f"must be >= 0, got {config.wd}")
  check(config.grad_clip_norm is None or config.grad_clip_norm >= 0, "grad_clip_norm",
        f"must be >= 0 (0 = off), got {config.grad_clip_norm}")
  check(config.keep_ckpts >= 0, "keep_ckpts", f"must be >= 0 (0 = keep all), got {config.keep_ckpts}")
  check(config.keep_ckpt_steps >= 0, "keep_ckpt_steps", f"must be >= 0, got {config.keep_ckpt_steps}")
  check(config.input.prefetch >= 0, "input.prefetch", f"must be >= 0, got {config.input.prefetch}")
  check(config.mfu_peak_flops >= 0, "mfu_peak_flops", f"must be >= 0, got {config.mfu_peak_flops}")
  _check_choice(config.nan_policy, "nan_policy", ("stop", "skip"))
  check(config.profile.start_step >= 1, "profile.start_step",
        f"must be >= 1, got {config.profile.start_step}")
  check(config.profile.num_steps >= 0, "profile.num_steps",
        f"must be >= 0 (0 = off), got {config.profile.num_steps}")
  _check_choice(config.input.bad_examples, "input.bad_examples", ("skip", "error"))
  check(0 <= config.input.max_bad_fraction <= 1, "input.max_bad_fraction",
        f"must be in [0, 1], got {config.input.max_bad_fraction}")
  spike = config.spike_skip
  check(spike.window >= 0, "spike_skip.window", f"must be >= 0 (0 = off), got {spike.window}")
  check(spike.k > 0, "spike_skip.k", f"must be > 0, got {spike.k}")
  check(spike.get("std_floor", 0.0) >= 0, "spike_skip.std_floor", f"must be >= 0, got {spike.get('std_floor')}")
  check(config.get("max_consecutive_skips", 0) >= 0, "max_consecutive_skips",
        f"must be >= 0 (0 = no limit), got {config.get('max_consecutive_skips')}")
  check(spike.min_steps >= 2, "spike_skip.min_steps", f"must be >= 2 (a std needs two losses), got {spike.min_steps}")

  from big_vision_lite import sharding  # local import: keep config importable without jax
  sizes = sharding.resolve_mesh_shape(config.mesh, num_devices)
  batch_devices = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  per_step = config.input.batch_size // config.grad_accum_steps
  check(config.input.batch_size % config.grad_accum_steps == 0, "input.batch_size",
        f"{config.input.batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}")
  check(per_step % batch_devices == 0, "input.batch_size",
        f"{config.input.batch_size} (per micro-step {per_step}) is not divisible by the "
        f"{batch_devices} batch-parallel devices (mesh data*fsdp*expert = "
        f"{sizes['data']}*{sizes['fsdp']}*{sizes['expert']})")
  check(config.input.batch_size % process_count == 0, "input.batch_size",
        f"{config.input.batch_size} is not divisible by the {process_count} processes")
  _check_data(config.input.data, "input.data")
  for name, ev in config.evals.items():
    check("type" in ev, f"evals.{name}.type", "missing (e.g. 'classification')")
    if "data" in ev:
      check(ev.data.get("name") != "mixture", f"evals.{name}.data.name",
            "a mixture is for training (its epoch repeats members); evaluate each member")
      _check_data(ev.data, f"evals.{name}.data")
    bs = ev.get("batch_size", config.input.batch_size)
    check(bs % batch_devices == 0 and bs % process_count == 0, f"evals.{name}.batch_size",
          f"{bs} is not divisible by the {batch_devices} batch-parallel devices")


def _check_choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
  check(value in allowed, key, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        f"{_suggest(str(value), allowed)}")


def config_changes(saved: dict, current: dict, allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
  """'config.a.b: old -> new' for every leaf that differs, except keys under `allowed` prefixes.

  Both are plain dicts as in a workdir's config.json (`ConfigDict.to_json_best_effort`).
  """
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict) and v:
        out.update(flat(v, name + "."))
      else:
        out[name] = v
    return out
  a, b = flat(saved), flat(current)
  changes = []
  for name in sorted(set(a) | set(b)):
    if any(name == p or name.startswith(p + ".") for p in allowed):
      continue
    if a.get(name, "<unset>") != b.get(name, "<unset>"):
      changes.append(f"config.{name}: {a.get(name, '<unset>')!r} -> {b.get(name, '<unset>')!r}")
  return changes


def _check_data(data: ConfigDict, key: str) -> None:
  name = data.get("name")
  check(bool(name), f"{key}.name", "missing dataset name")
  from big_vision_lite.data import sources  # pylint: disable=import-outside-toplevel
  kind = sources.source_kind(name)
  if kind is not None:
    for k in kind.required:
      check(bool(data.get(k)), f"{key}.{k}", f"{name} needs a file pattern or list" if k == "files"
            else f"{name} needs it set")
    if name == "mixture":
      from big_vision_lite.data import sources_mixture  # pylint: disable=import-outside-toplevel
      for member, member_data, _, _ in sources_mixture.members_of(data, f"config.{key}"):
        _check_data(member_data, f"{key}.members.{member}")
    return
  data_dir = data.get("data_dir")
  check(bool(data_dir), f"{key}.data_dir",
        f"required for tfds dataset {name!r} (nothing is downloaded at run time){sources.tfds_hint(name)}")
  from big_vision_lite import storage  # pylint: disable=import-outside-toplevel
  try:
    found = storage.isdir(data_dir)
  except storage.StorageError as e:
    raise ConfigError(f"config.{key}.data_dir: {e}") from None
  check(found, f"{key}.data_dir", f"directory {data_dir!r} does not exist")
