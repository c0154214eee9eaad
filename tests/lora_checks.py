"""Checks shared by the reference and the Triton tests of the frozen-A LoRA linear."""

import torch

import keeplora_kernels as kk


def assert_saves_only_s(x, w, b, a, lb):
    """``kk.lora_linear`` (whatever backend is selected) keeps ``s = x·Aᵀ`` (T×r) for backward and no T×d_in
    activation; returns the output so that a test can run backward from it."""
    x.requires_grad_()
    lb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kk.lora_linear(x, w, b, a, lb, 1.0)
    d_in, r = x.shape[-1], a.shape[0]
    tokens = x.numel() // d_in
    activations = [t for t in saved if t.shape[0] == tokens]
    assert [tuple(t.shape) for t in activations] == [(tokens, r)]
    assert all(t.numel() <= max(w.numel(), tokens * r) for t in saved)
    assert not any(t.shape in (x.shape, (tokens, d_in)) for t in saved)
    return y
