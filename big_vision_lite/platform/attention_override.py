"""Traces code with another attention implementation inside a context (plan, the device check).

`config.model.attention_impl` chooses the implementation for a run (platform.configure); this
swaps it while a block is traced, so one process can compile the same step with two
implementations and compare them (`plan` prints splash against XLA attention).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

from big_vision_lite.platform import dispatch

ATTENTION_IMPLS = tuple(dispatch.ATTENTION)


@contextlib.contextmanager
def attention_impl(name: str) -> Iterator[None]:
  """Traces models.common's attention with `name` (a key of platform.ATTENTION) inside."""
  if name not in ATTENTION_IMPLS and name != dispatch.AUTO:
    raise ValueError(f"attention_impl {name!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  saved = dispatch._settings  # noqa: SLF001 - this module is the dispatcher's own override
  dispatch._settings = dataclasses.replace(saved, attention=name)
  try:
    yield
  finally:
    dispatch._settings = saved
