"""keeplora: KeepLoRA continual learning (residual gradient adaptation) for Hugging Face models.

from keeplora import KeepLoRA, KeepLoRAConfig
kl = KeepLoRA(model, KeepLoRAConfig(target_modules=["query", "value"], r=16))
kl.begin_task(loader, loss_fn); ...train kl.trainable_parameters()...; kl.end_task(loader, loss_fn)
"""

__version__ = "0.1.0"

from .config import KeepLoRAConfig
from .engine import KeepLoRA, KeepLoRAWarning
from .state import ContinualState
from .statistics import EmptyDataError

__all__ = ["KeepLoRA", "KeepLoRAConfig", "KeepLoRAWarning", "ContinualState", "EmptyDataError", "KeepLoRACallback"]


def __getattr__(name):
    if name == "KeepLoRACallback":  # lazy: importing transformers' Trainer machinery is slow
        from .trainer import KeepLoRACallback

        return KeepLoRACallback
    raise AttributeError(name)
