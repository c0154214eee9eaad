"""Bitwise check of the memory update across a code change: run once per checkout with ``--save FILE`` and compare
the two files with ``--compare A B``. Cases: the exact path, and the randomized path (small start so that the
sketch grows, hands over to eigh, or stops at the free dimensions) on decaying, flat and low-rank moments, fp32 and
fp64, empty and partly filled bases."""

import sys

import torch

from keeplora import basis as basis_module
from keeplora.basis import expand_bases


def moment(d, values, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    return ((q * torch.as_tensor(values, dtype=torch.float64)) @ q.T).to(dtype)


def cases():
    for dtype in (torch.float32, torch.float64):
        for d in (96, 256):
            g = torch.Generator().manual_seed(d)
            decaying = moment(d, [0.9 ** i for i in range(d)], 1, dtype)
            flat = moment(d, [1.0] * d, 2, dtype)
            low = moment(d, [1.0 / (i + 1) if i < 12 else 0.0 for i in range(d)], 3, dtype)
            power = moment(d, [(i + 1) ** -1.2 for i in range(d)], 4, dtype)
            filled = torch.linalg.qr(torch.randn(d, d // 3, generator=g, dtype=torch.float64)).Q.to(dtype)
            bases = {"a": torch.zeros(d, 0, dtype=dtype), "b": filled, "c": torch.zeros(d, 0, dtype=dtype),
                     "d": filled[:, :5].contiguous()}
            moments = {"a": decaying, "b": power, "c": low, "d": flat}
            for energy in (0.5, 0.9, 0.99):
                yield f"{dtype} d={d} ε={energy}", bases, moments, energy


def run():
    basis_module.RANDOMIZED_START = 8
    out = {}
    for name, bases, moments, energy in cases():
        for method in ("exact", "randomized"):
            for key, value in expand_bases(bases, moments, energy, method=method, oversample=4).items():
                out[f"{name} {method} {key}"] = value
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--save":
        torch.save(run(), sys.argv[2])
    else:
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        different = [k for k in a if not (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
        print(f"{len(a)} bases compared ({len(a) == len(b) and set(a) == set(b)} same keys), "
              f"{len(different)} different: {different[:5]}")
