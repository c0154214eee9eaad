"""Baselines that benchmarks and the main job run side by side with KeepLoRA (imported, never re-defined)."""

from .authors import AuthorsKeepLoRA, AuthorsLoRALinear

__all__ = ["AuthorsKeepLoRA", "AuthorsLoRALinear"]
