"""Periodic work of the training loop, one small module per hook (metrics, evaluation, checkpoint...)."""

from big_vision_lite.hooks.base import Hook, StepInfo, every_n

__all__ = ["Hook", "StepInfo", "every_n"]
