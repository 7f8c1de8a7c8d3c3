"""Plan a run before paying for it: compile the real train step ahead of time for a TPU topology
(or the local CPU backend) and print per-chip memory, FLOPs and a step-time lower bound.

    python -m big_vision_lite.plan --config configs/vit_i1k.py --topology v5e:16x16 \
        [--config.input.batch_size=4096 ...] [--config.model.attention_impl=splash] [--json plan.json]

TPU topologies need libtpu (`pip install big_vision_lite[tpu]`) but no TPU: the step is
compiled on this CPU host for compile-only devices. Nothing is read from the dataset unless
it is present (its first example fixes the input shapes); otherwise a synthetic record is
run through config.input.pp. Exit status 2 with one line when the input is bad or the
configuration does not fit in the chip's memory. With --config.model.attention_impl=splash
(Pallas TPU splash attention) the step is also compiled with the XLA attention and both
per-chip totals are printed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

GiB = 1024**3
# Stands in for total_steps when a config counts epochs (that needs the dataset's size);
# only the LR schedule's length depends on it, not the compiled step's cost.
_PLAN_STEPS = 10_000_000


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip numbers from Cloud TPU's published system specs (bf16 dense peak)."""
  name: str
  hbm_bytes: float
  hbm_bytes_per_s: float
  peak_flops: float
  dims: int  # topology dims: 2 (v5e, v6e: 2D torus slices) or 3 (v4, v5p)
  megacore: bool  # two TensorCores presented as one JAX device


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 1228e9, 275e12, 3, True),
    "v5e": Chip("TPU v5e", 16 * GiB, 819e9, 197e12, 2, False),
    "v5p": Chip("TPU v5p", 95 * GiB, 2765e9, 459e12, 3, True),
    "v6e": Chip("TPU v6e", 32 * GiB, 1640e9, 918e12, 2, False),
}


class PlanError(ValueError):
  """Bad topology, config or a configuration that does not fit; printed as one line."""


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:16x16' -> ('v5e', (16, 16)); 'cpu:8' -> ('cpu', (8,)). Raises PlanError."""
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", topology.strip().lower())
  if not m:
    raise PlanError(f"--topology {topology!r}: expected GEN:AxB[xC] (e.g. v5e:16x16, v4:2x2x1) or cpu:N")
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if gen == "cpu":
    if len(dims) != 1 or dims[0] < 1:
      raise PlanError(f"--topology {topology!r}: the local backend takes one device count, e.g. cpu:8")
    return gen, dims
  if gen not in CHIPS:
    raise PlanError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: "
                    f"{', '.join(sorted(CHIPS))} (or cpu:N)")
  if len(dims) != CHIPS[gen].dims or min(dims) < 1:
    example = "x".join(["2"] * CHIPS[gen].dims)
    raise PlanError(f"--topology {topology!r}: {gen} topologies have {CHIPS[gen].dims} dimensions, "
                    f"e.g. {gen}:{example}")
  return gen, dims


def topology_devices(topology: str) -> tuple[list[Any], Chip | None]:
  """Compile-only TPU devices for a topology (needs libtpu), or the local CPU devices."""
  gen, dims = parse_topology(topology)
  import jax
  if gen == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < dims[0]:
      raise PlanError(f"--topology {topology}: this process has {len(devices)} CPU devices; start a "
                      f"fresh process (the plan command sets jax_num_cpu_devices itself)")
    return devices[:dims[0]], None
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise PlanError(f"--topology {topology}: TPU planning needs libtpu; pip install "
                    f"'big_vision_lite[tpu]'") from None
  from jax.experimental import topologies
  chip = CHIPS[gen]
  kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
  try:
    desc = topologies.get_topology_desc(topology_name=f"{gen}:{'x'.join(map(str, dims))}",
                                        platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's errors are long; keep the first line.
    raise PlanError(f"--topology {topology}: {str(e).splitlines()[0][:300]}") from None
  return list(desc.devices), chip


# ----------------------------------------------------------------------------- example


def _synthetic_record() -> dict:
  """A raw record with the keys pp specs commonly read, for datasets that are not on this machine."""
  import numpy as np
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
      buf, format="PNG")
  text = b"a photo of a red circle on a white background"
  # Region annotations as tar shards carry them in KEY.json (ops_locca.json_regions).
  regions = b'{"regions": [{"text": "a red circle", "box": [0.1, 0.2, 0.5, 0.6]}]}'
  return {"image": buf.getvalue(), "label": np.int64(0), "id": np.int64(0), "texts": text,
          "text": text, "caption": text, "captions": text, "json": regions}


def example_for(config) -> tuple[dict, str]:
  """One preprocessed example (batch dim 1) and where it came from."""
  import numpy as np
  from big_vision_lite import build
  try:
    return build.example_batch(config.input), f"first example of {config.input.data.get('name')}"
  except Exception as first:  # noqa: BLE001 - no data here is the normal case when planning
    from big_vision_lite.data import ops as pp_ops
    try:
      ex = pp_ops.get_preprocess_fn(config.input.pp)(_synthetic_record(), np.random.default_rng(0))
    except Exception as e:  # noqa: BLE001
      raise PlanError(f"config.input: the dataset is not readable here ({type(first).__name__}: "
                      f"{str(first)[:120]}) and a synthetic record does not preprocess with "
                      f"config.input.pp ({type(e).__name__}: {str(e)[:120]})") from None
    return {k: np.asarray(v)[None] for k, v in ex.items()}, "synthetic record through config.input.pp"


# ----------------------------------------------------------------------------- plan


def _for_validation(config):
  """A copy whose data sections name the built-in dataset: the plan checks sizes, not data paths."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.input.data = {"name": "bvl_shapes", "split": "train"}
    for ev in c.evals.values():
      if "data" in ev:
        ev.data = {"name": "bvl_shapes", "split": "validation"}
    if c.total_steps <= 0:
      c.total_steps = _PLAN_STEPS
  return c


def plan(config, topology: str, memory_gib: float | None = None) -> dict[str, Any]:
  """Compiles the train step for `topology`; returns the numbers `main` prints.

  `memory_gib` replaces the per-device capacity the total is checked against
  (e.g. to keep headroom, or for a chip variant with other HBM).
  """
  import flax.linen as nn
  import jax
  from big_vision_lite import build, config as config_lib, distributed, flops, platform, sharding, train_step

  impl = attention_impl_of(config)
  if impl == "splash" and parse_topology(topology)[0] == "cpu":
    raise PlanError(f"config.model.attention_impl=splash is a TPU kernel: plan it for a TPU "
                    f"topology (e.g. v5e:2x2), not {topology}")
  devices, chip = topology_devices(topology)
  # Implementations for the target's backend: a TPU plan never measures CPU kernels here.
  platform.configure(config, backend=devices[0].platform)
  hosts = len({d.process_index for d in devices})
  config_lib.validate(_for_validation(config), len(devices), hosts)
  config = copy.deepcopy(config)
  if config.total_steps <= 0:
    with config.unlocked():
      # Only the LR schedule's length depends on it; an epoch count would need the dataset.
      config.total_steps = _PLAN_STEPS
  mesh = sharding.make_mesh(config.mesh, devices)
  batch = int(config.input.batch_size)
  layout_note = ""
  try:
    distributed.check_batch_layout(mesh, batch, hosts)
  except ValueError as e:
    layout_note = str(e)

  example, example_src = example_for(config)
  t0 = time.perf_counter()
  setup = build.build(config, mesh=mesh, example=example)
  abstract_batch = {
      k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
      for k, v in example.items()}

  def compile_step(impl: str):
    # A fresh step function per implementation: jit caches traces by function, and the
    # implementation is read while tracing.
    step = train_step.make_train_step(setup, config.grad_accum_steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules), \
        platform.override(attention=impl):
      lowered = step.lower(setup.abstract_state, abstract_batch)
      try:
        return lowered.compile()
      except Exception as e:  # noqa: BLE001 - XLA refuses to compile what cannot fit its chip
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
          raise
        reason = next((line.strip() for line in msg.splitlines() if "RESOURCE_EXHAUSTED" in line), msg[:300])
        raise PlanError(f"does not fit on {topology} at batch {batch} with {impl} attention "
                        f"({reason.split('RESOURCE_EXHAUSTED: ')[-1]}); shard more (config.mesh fsdp), "
                        "lower the batch or raise grad_accum_steps") from None

  compiled = compile_step(impl)
  compile_s = time.perf_counter() - t0
  # The same step with the XLA attention, for the memory a fused kernel saves.
  xla_attention = None
  if impl not in ("xla", "auto"):
    try:
      xla_attention = _memory(compile_step("xla"))
    except PlanError as e:
      xla_attention = {"error": str(e)}

  mem = _memory(compiled)
  args_b, out_b, alias_b = mem["argument_bytes"], mem["output_bytes"], mem["alias_bytes"]
  temp_b, code_b, total_b = mem["temp_bytes"], mem["code_bytes"], mem["total_bytes"]
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  xla_flops = float(cost.get("flops", 0.0))
  hbm_bytes = float(cost.get("bytes accessed", 0.0))

  n = len(devices)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
  fwd = flops.model_forward_flops(setup.model, example)
  model_step_flops = flops.train_flops_per_step(fwd, batch) if fwd else None
  if chip is not None:
    peak, bw, capacity, kind = chip.peak_flops, chip.hbm_bytes_per_s, chip.hbm_bytes, chip.name
    capacity_desc = "HBM"
  else:
    peak, _ = flops.default_peak_flops(devices[0])
    bw = None
    capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / n
    kind, capacity_desc = f"CPU ({devices[0].device_kind})", f"host RAM / {n}"
  if memory_gib:
    capacity, capacity_desc = memory_gib * GiB, "(--memory_gib)"
  compute_s = xla_flops / peak if peak else None
  memory_s = hbm_bytes / bw if bw else None
  bound = max(x for x in (compute_s, memory_s) if x is not None) if (compute_s or memory_s) else None
  return {
      "topology": topology, "device_kind": kind, "devices": n, "hosts": hosts,
      "mesh": dict(mesh.shape), "global_batch": batch, "per_device_batch": batch / max(
          1, mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]),
      "params": params, "example": example_src,
      "argument_bytes": args_b, "output_bytes": out_b, "alias_bytes": alias_b, "temp_bytes": temp_b,
      "code_bytes": code_b, "total_bytes": total_b, "capacity_bytes": capacity,
      "capacity_desc": capacity_desc, "fits": total_b <= capacity,
      "xla_flops_per_device": xla_flops, "model_flops_per_step": model_step_flops,
      "hbm_bytes_per_device": hbm_bytes, "peak_flops": peak, "hbm_bytes_per_s": bw,
      "compute_bound_s": compute_s, "memory_bound_s": memory_s, "step_time_lower_bound_s": bound,
      "compile_s": compile_s, "layout_note": layout_note,
      "attention_impl": impl, "xla_attention": xla_attention,
      # Pallas kernels in the compiled step (splash attention's forward and backward calls).
      "tpu_custom_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
  }


def _memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step; total = arguments + outputs - aliased + temps + code."""
  mem = compiled.memory_analysis()
  out = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
         "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
         "code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["code_bytes"])
  return out


def attention_impl_of(config) -> str:
  """The attention implementation the config names (config.model.attention_impl; "auto")."""
  return (config.model.get("attention_impl", None) if "model" in config else None) or "auto"


def _gib(b: float) -> str:
  return f"{b / GiB:.2f} GiB"


def _ms(s: float | None) -> str:
  return "n/a" if s is None else f"{s * 1e3:.2f} ms"


def format_plan(p: dict[str, Any]) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [
      f"topology {p['topology']}: {p['devices']} x {p['device_kind']}, {p['hosts']} host(s); "
      f"mesh {mesh}",
      f"batch {p['global_batch']} ({p['per_device_batch']:g} per batch-parallel device); "
      f"{p['params'] / 1e6:.2f} M params; input shapes from the {p['example']}",
      f"memory per device: arguments {_gib(p['argument_bytes'])}, outputs {_gib(p['output_bytes'])} "
      f"({_gib(p['alias_bytes'])} aliased to donated arguments), temporaries {_gib(p['temp_bytes'])}, "
      f"code {_gib(p['code_bytes'])}; total {_gib(p['total_bytes'])} of {_gib(p['capacity_bytes'])} "
      f"{p['capacity_desc']} ({100 * p['total_bytes'] / p['capacity_bytes']:.1f}%)",
      f"FLOPs per step: {p['xla_flops_per_device']:.4g} per device (XLA cost analysis)"
      + (f", {p['model_flops_per_step']:.4g} model FLOPs for the whole step (analytic, "
         f"{p['model_flops_per_step'] / p['devices']:.4g} per device)" if p["model_flops_per_step"] else ""),
      f"step time >= {_ms(p['step_time_lower_bound_s'])}: compute {_ms(p['compute_bound_s'])} "
      f"(FLOPs / {p['peak_flops'] / 1e12:.4g} TFLOP/s peak), memory {_ms(p['memory_bound_s'])} "
      + (f"({p['hbm_bytes_per_device'] / 1e9:.3g} GB accessed / {p['hbm_bytes_per_s'] / 1e9:.0f} GB/s)"
         if p["hbm_bytes_per_s"] else "(no bandwidth figure for this backend)"),
      f"compiled in {p['compile_s']:.1f} s",
  ]
  x = p.get("xla_attention")
  if x and "error" in x:
    lines.insert(3, f"attention {p['attention_impl']}: total {_gib(p['total_bytes'])} per device; "
                    f"with the XLA attention the step {x['error']}")
  elif x:
    lines.insert(3, f"attention {p['attention_impl']}: total {_gib(p['total_bytes'])} per device "
                    f"(temporaries {_gib(p['temp_bytes'])}) vs {_gib(x['total_bytes'])} "
                    f"(temporaries {_gib(x['temp_bytes'])}) with the XLA attention; "
                    f"{p['tpu_custom_calls']} Pallas kernel calls in the step")
  if p["layout_note"]:
    lines.append(f"note: {p['layout_note'].split(';')[0]}; each host's batch is spread over its "
                 f"devices' rows (per-example losses are unaffected)")
  return "\n".join(lines)


def _recipe_vocab(path: str) -> int:
  """The recipe's default vocabulary size: its module's VOCAB (siglip2_b16: Gemma's 256k), else
  32,000 (big_vision's c4_en sentencepiece model, the other recipes' default)."""
  import importlib.util
  from big_vision_lite import recipes
  path = path if os.path.isfile(path) else (recipes.recipe_path(path) or path)
  module_spec = importlib.util.spec_from_file_location("bvl_plan_recipe", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return int(getattr(module, "VOCAB", 32_000))


def load_for_plan(spec: str):
  """load_config(spec); a recipe that asks for its sentencepiece file gets a stand-in tokenizer of
  the recipe's vocabulary size instead: the compiled step depends on that size only."""
  from big_vision_lite import config as config_lib
  from big_vision_lite.data.tokenizers import STAND_IN_PREFIX
  try:
    return config_lib.load_config(spec)
  except config_lib.ConfigError as e:
    if not str(e).startswith("config arg spm:"):
      raise
  path, _, arg = spec.partition(":")
  vocab = re.search(r"(?:^|,)\s*vocab\s*=\s*(\d+)", arg)
  size = vocab.group(1) if vocab else str(_recipe_vocab(path))
  print(f"note: no spm= given; planning with the {STAND_IN_PREFIX}{size} tokenizer (shapes only)",
        file=sys.stderr, flush=True)
  return config_lib.load_config(f"{path}:{arg + ',' if arg else ''}spm={STAND_IN_PREFIX}{size}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m big_vision_lite.plan", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="path/to/config.py[:arg], or a shipped recipe's NAME[:arg]")
  parser.add_argument("--topology", required=True, help="v4:2x2x1, v5e:16x16, v5p:2x2x1, v6e:4x4 or cpu:N")
  parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
  parser.add_argument("--memory_gib", type=float, default=0.0,
                      help="check the total against this many GiB per device instead of the chip's")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
    overrides.append(item)
  # Before JAX is imported: compile on this host; libtpu serves only as a compiler.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock file: no TPU is opened
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax
  from big_vision_lite import config as config_lib, sharding
  try:
    gen, dims = parse_topology(args.topology)
    if gen == "cpu":
      try:
        jax.config.update("jax_num_cpu_devices", dims[0])
      except RuntimeError:
        pass  # backend already up (e.g. in tests); topology_devices checks the count
    from absl import flags as absl_flags
    absl_flags.FLAGS.mark_as_parsed()
    config = load_for_plan(args.config)
    config = config_lib.apply_overrides(config, overrides)
    result = plan(config, args.topology, args.memory_gib or None)
  except (PlanError, config_lib.ConfigError, sharding.MeshError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_plan(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if not result["fits"]:
    print(f"error: does not fit: {_gib(result['total_bytes'])} per device needed (arguments "
          f"{_gib(result['argument_bytes'])}, temporaries {_gib(result['temp_bytes'])}) but "
          f"{result['device_kind']} has {_gib(result['capacity_bytes'])} {result['capacity_desc']}; "
          f"shard more (config.mesh fsdp), lower the batch or raise grad_accum_steps", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
