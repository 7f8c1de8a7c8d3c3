"""Stand-in for the platform attention dispatch: the fused kernel traced while a context is set.

`config.model.attention_impl` will select the implementation through the platform layer's
registry; until the model reads that key itself, `plan` sets it around tracing with
`attention_impl(name)`, and models.common's attention asks `fused_attention` first.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

Array = jax.Array

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
_IMPL = contextvars.ContextVar("attention_impl", default="xla")


@contextlib.contextmanager
def attention_impl(name: str) -> Iterator[None]:
  """Traces models.common's attention with `name` ("xla", "cudnn" or "splash") inside."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {name!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  token = _IMPL.set(name)
  try:
    yield
  finally:
    _IMPL.reset(token)


def fused_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array | None:
  """The selected implementation on pre-scaled BTNH q/k/v, or None: run the XLA math.

  None also when the selected kernel does not take these operands (a masked decoder
  layer under splash, fp32 under cuDNN), so every layer still runs.
  """
  impl = _IMPL.get()
  if impl == "cudnn":
    # Imported when selected: the kernels' modules load Pallas / cuDNN code paths.
    from big_vision_lite.platform.gpu import attention as gpu
    if gpu.supports_cudnn(q, k, v, mask):
      return gpu.cudnn_attention(q, k, v, mask=mask, scale=1.0)
  elif impl == "splash":
    from big_vision_lite.platform.tpu import attention as tpu
    if tpu.supports_splash(q, k, v, mask):
      return tpu.splash_attention(q, k, v, mask=mask, scale=1.0)
  return None
