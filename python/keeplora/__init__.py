"""keeplora: KeepLoRA continual learning for Hugging Face models."""
__version__ = "0.1.0"
