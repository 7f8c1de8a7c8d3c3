"""Model registry: `get_model("vit", variant="S/16", ...)` builds a Flax module by name."""

from __future__ import annotations

import flax.linen as nn

from big_vision_lite.registry import Registry

MODELS = Registry("model", "big_vision_lite.models")


def get_model(name: str, **kwargs) -> nn.Module:
  """Returns the model registered as `name`, built with `kwargs`."""
  return MODELS.get(name)(**kwargs)
