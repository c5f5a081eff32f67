"""Reconstruction targets, one module per kind; importing the package registers them in TARGETS."""
from .base import TARGETS, Frozen, Target, TargetContext, build_target, register_target
from . import pixels, hog, tokens, teacher, ema  # noqa: F401,I001  (each registers its kind, listed in this order)

__all__ = ["TARGETS", "Frozen", "Target", "TargetContext", "build_target", "register_target"]
