"""Named XLA_FLAGS presets for GPU runs (config.platform.xla_flags_preset), set before JAX starts.

XLA reads XLA_FLAGS once, when the backend initialises, so a preset cannot be applied from a
jitted step. Two places apply it, both from the config: launch/gpu.sh and launch/slurm.sbatch
export `python -m big_vision_lite.platform.gpu.xla_flags --config ... [--config.key=value]`'s
output (so the command they echo shows the flags), and the trainer calls `apply(config)`
before it first asks JAX for devices, for a run started without the launcher. Flags the user
already put in XLA_FLAGS win: the preset only adds flags whose name is not there.

    python -m big_vision_lite.platform.gpu.xla_flags --config configs/vit_i1k.py
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

# MaxText's GPU settings (its configs/a3 launch scripts and GPU performance notes), less
# the two that reach beyond the GPU backend or are gone from current XLA:
# --xla_disable_hlo_passes=rematerialization also applies on CPU/TPU and removes XLA's
# memory safety net (our remat is config.model.remat_policy), and --xla_gpu_graph_level
# is replaced by --xla_gpu_enable_command_buffer.
GPU_DEFAULT = (
    # Overlap collectives with compute (the latency-hiding scheduler) on a priority stream.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    # cuBLAS(Lt) GEMMs rather than Triton's, and no CUDA-graph command buffers.
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_command_buffer=",
    # Combine small collectives into few large ones (FSDP gathers, gradient reductions).
    "--xla_gpu_all_reduce_combine_threshold_bytes=536870912",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    # Pipeline collectives across scanned layers (config.model.scan) and double-buffer loops.
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)

PRESETS: dict[str, tuple[str, ...]] = {"none": (), "gpu_default": GPU_DEFAULT}
DEFAULT_PRESET = "gpu_default"


def _unknown(name: str) -> str:
  return f"config.platform.xla_flags_preset={name!r} is not one of {', '.join(PRESETS)}"


def preset_name(config: Any) -> str:
  """config.platform.xla_flags_preset (DEFAULT_PRESET when the config has no platform section).

  An unknown name is a ConfigError (imported here: this module stays importable without
  ml_collections, for benchmarks/accelerator_check.py).
  """
  platform = config.get("platform", None) if hasattr(config, "get") else None
  name = (platform or {}).get("xla_flags_preset", DEFAULT_PRESET)
  if name not in PRESETS:
    from big_vision_lite.config import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(_unknown(name))
  return name


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def merged(preset: str, existing: str = "") -> str:
  """XLA_FLAGS with the preset's flags that `existing` does not set, then `existing` itself."""
  if preset not in PRESETS:
    raise ValueError(_unknown(preset))
  have = {_flag_name(f) for f in existing.split()}
  add = [f for f in PRESETS[preset] if _flag_name(f) not in have]
  return " ".join(add + existing.split())


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return bool(xla_bridge.backends_are_initialized())


def apply(config: Any, environ: Mapping[str, str] | None = None) -> str | None:
  """Adds the config's preset to os.environ["XLA_FLAGS"] if JAX has not started its backend.

  Returns a one-line note when the preset has flags that can no longer take effect (the
  backend is already up, e.g. train.main called from a program that used JAX), else None.
  """
  env = os.environ if environ is None else environ
  name = preset_name(config)
  existing = env.get("XLA_FLAGS", "")
  want = merged(name, existing)
  if want == " ".join(existing.split()):
    return None
  if _backend_started():
    import jax  # pylint: disable=import-outside-toplevel
    if jax.default_backend() != "gpu":
      return None  # xla_gpu_* flags do nothing on this backend anyway
    return (f"note: config.platform.xla_flags_preset={name} not applied: JAX's backend is "
            f"already running; set XLA_FLAGS before starting (launch/gpu.sh does)")
  env["XLA_FLAGS"] = want  # type: ignore[index]
  return None


def main(argv: Sequence[str] | None = None) -> int:
  """Prints XLA_FLAGS for a config: its preset merged with the current XLA_FLAGS.

  Takes the trainer's command line (--config, --config.key=value; other flags are ignored),
  so a launcher can pass its arguments through unchanged.
  """
  from big_vision_lite import config as config_lib  # pylint: disable=import-outside-toplevel
  args = list(sys.argv[1:] if argv is None else argv)
  spec, overrides, i = None, [], 0
  while i < len(args):
    a = args[i]
    if a == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 2
      continue
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a.startswith("--config."):
      overrides.append(a)
    i += 1
  try:
    if spec is None:
      name = DEFAULT_PRESET
    else:
      name = preset_name(config_lib.apply_overrides(config_lib.load_config(spec), overrides))
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(merged(name, os.environ.get("XLA_FLAGS", "")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
