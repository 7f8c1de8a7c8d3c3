"""Digests of a train state's arrays and of a data iterator's state, to catch corrupt checkpoints.

An array's digest is two 32-bit sums over its elements of a mixing hash of (flat index, bits).
A sum does not depend on how the array is sharded, over which devices or processes, so a
checkpoint saved on one mesh is checked after a restore onto another. For a fixed index the
hash is a bijection of the element's bits: any single changed element changes the first sum;
more changes go unseen with a probability of about 2**-64. XLA computes it where the arrays
live (one pass, no copy to the host); every process gets the same result.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B9, 0x85EBCA77)


def _mix(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: a bijection on uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The elements' bit patterns as uint32 (64-bit elements become two, along a new last axis)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _array_digest(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride & 0xFFFFFFFF)
    stride *= bits.shape[axis]
  first = _mix(_mix(index ^ jnp.uint32(_SEEDS[0])) + bits)
  second = _mix(first + jnp.uint32(_SEEDS[1]))
  return jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])


@jax.jit
def _digests(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_array_digest(x) for x in leaves]


def array_digests(named: dict[str, Any]) -> dict[str, str]:
  """{name: 16 hex digits} for a flat {name: array}; every process must call it (a jitted step)."""
  names = sorted(named)
  out = jax.device_get(_digests([named[n] for n in names]))
  return {n: f"{int(d[0]):08x}{int(d[1]):08x}" for n, d in zip(names, out)}


def data_state_digest(state: bytes | str) -> str:
  """sha256 of a data iterator's JSON state, parsed, so that formatting does not count."""
  canonical = json.dumps(json.loads(state), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()
