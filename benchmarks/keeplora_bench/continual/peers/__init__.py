"""Peer continual-learning methods run on the same benchmark loop as KeepLoRA (one module per method)."""
