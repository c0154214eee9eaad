"""Kernels that lost to the production path wherever they were measured, or that no GPU has measured yet: kept and
tested, never dispatched.

``keeplora_kernels._dispatch`` does not know these; call them from here. Each module states what it must beat to
be dispatched (the measurements are in ``benchmarks/results/h200/``):

* :mod:`.triton_lora_linear`: the Triton full-GEMM LoRA linear (``lora_linear_triton``,
  ``lora_linear_shared_triton``), dispatched when its bf16 training step beats the ``expand_first`` torch step and
  the compiled op at the Llama and CLIP layer shapes of ``keeplora_bench.micro.bench_lora_variants``.
* :mod:`.triton_lora_persistent`: the frozen-A LoRA linear on a persistent, TMA-fed Triton GEMM main loop with the
  rank-r products folded in (``lora_linear_persistent``), not yet measured on a GPU; dispatched when its bf16
  training step beats the ``expand_first`` torch step and the compiled op at those shapes.
* :mod:`.lora_variants`: the ``fused_dy`` backward order (one Triton pass over dY, the registered op
  ``keeplora::lora_dy_pass``), dispatched when ``expand_first/fused_dy`` beats ``expand_first/expand_first`` at
  those shapes; and the stacked ``[W; A]`` forward (``StackedLoRALinearFunction``, ``stack_frozen``), dispatched
  when its forward beats the ``expand_first`` forward there.

Importing this package never imports triton (the Triton modules load on first use).
"""

from .lora_variants import (
    BACKWARD_ORDERS,
    LoRALinearVariantFunction,
    StackedLoRALinearFunction,
    stack_frozen,
    variant_backward,
)

__all__ = [
    "BACKWARD_ORDERS",
    "LoRALinearVariantFunction",
    "StackedLoRALinearFunction",
    "stack_frozen",
    "variant_backward",
]
