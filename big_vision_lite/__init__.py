"""big_vision_lite: one sharded JAX/Flax trainer for vision and vision-language pretraining."""

__version__ = "0.1.0"
