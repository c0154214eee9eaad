"""The methods a user would pick instead of KeepLoRA, run as methods of the embedded benchmark (same data, budget,
seeds and training loop as every other method); each module's docstring names its source and every deviation from
the authors' code."""
