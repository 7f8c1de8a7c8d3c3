"""Device mesh from the config, logical-axis rules, and shardings for state and batches."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")


class MeshError(ValueError):
  pass


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the one `-1` axis so the product equals `num_devices`."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"config.mesh: unknown axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}")
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise MeshError(f"config.mesh: only one axis may be -1, got {fill}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise MeshError(f"config.mesh.{a}: size must be positive or -1, got {s}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise MeshError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                      f"({known} = {'*'.join(str(s) for s in sizes.values() if s != -1)})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"config.mesh: {dict(sizes)} needs {math.prod(sizes.values())} devices, "
                    f"but {num_devices} are available")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert), all of Auto type."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    # Topology-aware placement on TPU/GPU; falls back to plain order elsewhere.
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Normalises the config's rules table to what flax expects."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise MeshError(f"config.sharding_rules[{i}]: expected (logical_name, mesh_axes), got {rule!r}")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise MeshError(f"config.sharding_rules[{i}]: {a!r} is not a mesh axis {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 3 heads on tensor=2)."""
  if len(spec) > len(shape):
    return P()
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    keep = tuple(a for a in names if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in keep)
    fitted.append((keep if len(keep) > 1 else keep[0]) if keep and dim % size == 0 else None)
  return P(*fitted)


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (boxed, abstract) flax params tree, via the logical rules."""
  specs = nn.get_partition_spec(boxed_abstract_params)
  unboxed = nn.unbox(boxed_abstract_params)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec(s, x.shape, mesh)),
      mesh_specs, unboxed, is_leaf=lambda s: isinstance(s, P))


def _dict_key_suffix(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a tree path: the parameter's name inside optimizer state."""
  names = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    names.append(str(k.key))
  return tuple(reversed(names))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        params_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer state leaves that mirror a parameter take its sharding; others replicate.

  A state leaf mirrors a parameter when its path ends with that parameter's
  path and the shapes agree (Adam moments do; factored Adafactor statistics and
  counters do not). Frozen parameters have no state (MaskedNode), so nothing
  is needed for them.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  by_path = {}
  for (path, p), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                jax.tree_util.tree_flatten_with_path(params_shardings)[0]):
    by_path[_dict_key_suffix(path)] = (p.shape, sh)
  repl = NamedSharding(mesh, P())

  def pick(path, leaf):
    name = _dict_key_suffix(path)
    for i in range(len(name)):  # the state may nest the param tree under extra dict keys
      shape, sh = by_path.get(name[i:], (None, None))
      if sh is not None:
        return sh if shape == getattr(leaf, "shape", None) else repl
    return repl

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process numpy batches into global arrays sharded over the batch axes."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for k, v in local_batch.items()
  }
