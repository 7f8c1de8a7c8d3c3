"""The one torch import path of the converters: offline hub, and the torchvision op stub.

The only torchvision wheel (0.28.0) is CUDA-built, so its compiled ops cannot load
on a CPU-only torch; importing it then fails on `torchvision::nms` missing. timm and
open_clip only use its Python parts, so declaring the schemas it looks up lets it
import. Call `setup()` before importing timm, open_clip or transformers.
"""

from __future__ import annotations

import os
from typing import Any

# Schemas torchvision's Python side registers fake/meta kernels for at import time.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIB: Any = None  # Kept alive: the registration lasts as long as the Library object.


def setup() -> Any:
  """Sets HF_HUB_OFFLINE=1, declares the torchvision op schemas if missing; returns torch."""
  global _LIB
  # Nothing may touch the hub: all conversions are from local files.
  os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  try:
    import torch
  except ImportError as e:
    raise ImportError("the PyTorch converters need torch: pip install -e '.[torch]'") from e
  if _LIB is None:
    try:
      torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
      have_nms = True
    except RuntimeError:
      have_nms = False
    if not have_nms:
      _LIB = torch.library.Library("torchvision", "DEF")
      for schema in _TORCHVISION_SCHEMAS:
        _LIB.define(schema)
  return torch
