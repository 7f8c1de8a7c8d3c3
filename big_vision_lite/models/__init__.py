"""Model registry: `get_model("vit", variant="S/16", ...)` builds a Flax module by name."""

from __future__ import annotations

import flax.linen as nn

from big_vision_lite.registry import Registry

MODELS = Registry("model", "big_vision_lite.models")


# config.model keys that choose implementations, not architecture: the platform layer reads
# them (big_vision_lite.platform.configure), so the modules never see them.
PLATFORM_KEYS = ("attention_impl", "norm_impl")


def get_model(name: str, **kwargs) -> nn.Module:
  """Returns the model registered as `name`, built with `kwargs` (less PLATFORM_KEYS)."""
  return MODELS.get(name)(**{k: v for k, v in kwargs.items() if k not in PLATFORM_KEYS})
