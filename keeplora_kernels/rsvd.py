"""Randomized truncated SVD, batched, with an optional implicit residual projection ``(I − P·Pᵀ)·a``.

Halko–Martinsson–Tropp range finder with power iterations. The projection is folded into every product
(``Â·X = a·X − P·(Pᵀ·a·X)``, ``Âᵀ·Y = aᵀ·(Y − P·(Pᵀ·Y))``) so ``Â`` is never materialised.

Two implementations of one algorithm (the textbook version the tests compare with is ``tests/ref_subspace.py``):

* :func:`rsvd_extension`: ``torch.ops.keeplora.rsvd`` from ``csrc/`` (CPU and CUDA kernels; see csrc/README.md).
* :func:`rsvd_torch`: the same batched algorithm written in PyTorch: a counter-based Gaussian sketch shared by the
  batch (:func:`gaussian_sketch`, Philox in integer tensor arithmetic: the same numbers as the extension's),
  shifted CholeskyQR in float64 through batched GEMMs (:func:`cholesky_qr`), Rayleigh–Ritz through a second
  CholeskyQR of ``Bᵀ`` and an ``l × l`` SVD. It earns its lines twice: it is the path of an install without a
  compiler (or ``KEEPLORA_BACKEND=reference``), with the extension's sketch, so results do not depend on whether
  the extension was built beyond rounding; and it is the readable oracle the extension's kernels are tested
  against step by step. On the CPU it is somewhat slower than the extension (the Philox sketch in tensor ops,
  the per-pass Cholesky through LAPACK; ``benchmarks/results/cpu/principal_subspace_driver.md``).
"""

from __future__ import annotations

import math

import torch

from . import _dispatch

__all__ = [
    "rsvd",
    "rsvd_torch",
    "rsvd_extension",
    "rsvd_graph_entry",
    "small_svd_method",
    "gaussian_sketch",
    "cholesky_qr",
    "shifted_cholesky",
]

SMALL_SVD_METHODS = ("jacobi", "cusolver")


def small_svd_method(method: str | None = None) -> str:
    """The extension's small-SVD launcher on CUDA for sketch widths ``l ≤ 32``; sets it first when ``method`` is given.

    ``"jacobi"`` (default): the project's batched one-sided Jacobi kernel; ``"cusolver"``: cuSOLVER's
    ``gesvdjBatched`` (op ``keeplora::gesvdj_batched``). ``KEEPLORA_SMALL_SVD`` gives the initial choice (read once,
    by the library); this call changes it for the process. CPU calls and wider sketches are unaffected. Returns
    ``""`` when the extension is not loaded (setting then raises).
    """
    from . import _extension

    lib = _extension.library()
    if method is not None:
        if method not in SMALL_SVD_METHODS:
            raise ValueError(f"small_svd_method: method must be one of {SMALL_SVD_METHODS}, got {method!r}")
        if lib is None:
            raise RuntimeError(f"small_svd_method: the compiled extension is not loaded ({_extension.status()})")
        lib.set_small_svd_method(method)
    return "" if lib is None else lib.small_svd_method()


def _as_batch(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dim() == 3 else t.unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------
# The extension's algorithm in PyTorch (the fallback when the library is not built).

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_PHILOX_STREAM = (0x6B6C7261, 0x72737664)
_UNIT_ROUNDOFF_64 = 2.0**-53
_TINY_SHIFT = 1e-290


def _mulhilo(a: int, c: torch.Tensor):
    """High and low 32-bit words of ``a·c`` (a < 2³², c an int64 tensor of values < 2³²) without overflow."""
    x = a * (c >> 16)  # < 2^48
    y = a * (c & 0xFFFF)  # < 2^48
    lo = (y + ((x & 0xFFFF) << 16)) & _MASK32
    hi = (x + (y >> 16)) >> 16
    return hi, lo


def gaussian_sketch(seed: int, rows: int, cols: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The counter-based Gaussian sketch Ω (rows × cols) of ``csrc/kernels/philox.h`` in PyTorch.

    Philox4x32-10 on the counter ``(group, 0, stream)`` keyed by ``seed``, Box–Muller in float64 rounded to float32;
    element ``(i, j)`` is normal ``e % 4`` of group ``e // 4`` with ``e = j·rows + i``. Column j depends only on
    ``(seed, rows, j)``, so a wider sketch extends a narrower one. Equals ``torch.ops.keeplora.gaussian_sketch``
    up to the last bit of the devices' ``log``/``sin``/``cos``.
    """
    total = rows * cols
    groups = (total + 3) // 4
    seed &= (1 << 64) - 1
    g = torch.arange(groups, dtype=torch.int64, device=device)
    c0, c1 = g & _MASK32, g >> 32
    c2 = torch.full_like(g, _PHILOX_STREAM[0])
    c3 = torch.full_like(g, _PHILOX_STREAM[1])
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    u = (torch.stack([c0, c1, c2, c3], -1).to(torch.float64) + 0.5) * 2.0**-32
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = (2.0 * math.pi) * u[:, 1::2]
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).reshape(-1)[:total]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return z.to(torch.float32).to(out_dtype).reshape(cols, rows).mT


def shifted_cholesky(gram: torch.Tensor, shift_factor: float, check_rank: bool, info: torch.Tensor):
    """One CholeskyQR pass's ``l × l`` step, the twin of ``torch.ops.keeplora.shifted_cholesky``.

    ``gram (b, l, l) + s·I = RᵀR`` with ``s = shift_factor·tr(gram) + tiny``; returns ``(R, R⁻¹)`` (upper). ``info``
    (b,) int32 is or-ed in place: bit 1 where a factorisation failed (``R = R⁻¹ = I`` there, so the pass leaves Q
    unchanged), and with ``check_rank`` bit 2 where a column of ``Q·R⁻¹`` keeps less than half its squared norm,
    read off the factors: ``(Q·R⁻¹)ᵀ(Q·R⁻¹) = I − s·R⁻ᵀR⁻¹`` for ``gram = QᵀQ``.
    """
    b, l, _ = gram.shape
    g = gram.clone()
    diag = g.diagonal(0, -2, -1)
    tiny = _TINY_SHIFT if gram.dtype == torch.float64 else 1e-30
    shift = diag.sum(-1, keepdim=True) * shift_factor + tiny
    diag.add_(shift)
    r, failed = torch.linalg.cholesky_ex(g, upper=True)
    eye = torch.eye(l, dtype=r.dtype, device=r.device).expand(b, l, l)
    r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
    bad = (failed != 0).view(b, 1, 1)
    r, r_inv = torch.where(bad, eye, r), torch.where(bad, eye, r_inv)
    bits = (failed != 0).to(torch.int32)
    if check_rank:
        lost = ((1 - shift * r_inv.square().sum(-2)) < 0.5).any(-1) & (failed == 0)
        bits |= 2 * lost.to(torch.int32)
    info |= bits
    return r, r_inv


def cholesky_qr(
    y: torch.Tensor, shifted_passes: int = 1, plain_passes: int = 1, *, want_r: bool = True, check_rank: bool = True
):
    """Shifted CholeskyQR in float64: ``y (b, m, l) = Q·R``; returns ``(Q, R, info)`` like the extension's op.

    Each pass forms ``G = QᵀQ``, adds ``s·I``, factors ``G = RᵀR`` and sets ``Q ← Q·R⁻¹``
    (:func:`shifted_cholesky`). The first ``shifted_passes`` use ``s = 11(ml + l(l+1))·u·tr(G)`` (with which the
    factorisation provably succeeds for any finite input; Fukaya et al. 2020), the others ``s = u·tr(G)``.
    ``info``: bit 1 a factorisation failed, bit 2 (with ``check_rank``) a column of Q has norm² < 0.5 (y
    numerically rank-deficient).
    """
    q = y.to(torch.float64)
    b, m, l = q.shape
    info = torch.zeros(b, dtype=torch.int32, device=y.device)
    r_total = None
    c_shift = 11.0 * (m * l + l * (l + 1)) * _UNIT_ROUNDOFF_64
    passes = shifted_passes + plain_passes
    for index in range(passes):
        factor = c_shift if index < shifted_passes else _UNIT_ROUNDOFF_64
        r, r_inv = shifted_cholesky(q.mT @ q, factor, check_rank and index + 1 == passes, info)
        q = q @ r_inv  # Q·R⁻¹ as a GEMM (see csrc/rsvd.cpp)
        if want_r:
            r_total = r if r_total is None else r @ r_total
    return q, r_total, info


def _orthonormalize(y: torch.Tensor, compute: torch.dtype, householder: bool, want_r: bool, intermediate: bool = False):
    """``orthonormalize`` of csrc/rsvd.cpp: CholeskyQR2 (fp64 data: 4), or for an ``intermediate`` basis of the
    power iterations one shifted pass without the rank check; flagged blocks redone by Householder off CUDA."""
    passes = 2 if compute == torch.float64 else 1
    if householder:
        q, r = torch.linalg.qr(y.to(torch.float64), mode="reduced")
        return q, r, torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    shifted, plain = (1, 0) if intermediate else (passes, passes)
    q, r, info = cholesky_qr(y, shifted, plain, want_r=want_r, check_rank=not intermediate)
    if y.device.type != "cuda":  # reading the flag would synchronise a GPU; on the host it is free
        bad = info.nonzero().flatten()
        if bad.numel():
            q_h, r_h = torch.linalg.qr(y[bad].to(torch.float64), mode="reduced")
            q = q.index_copy(0, bad, q_h)
            if want_r:
                r = r.index_copy(0, bad, r_h)
    return q, r, info


def rsvd_torch(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 4,
    project_out: torch.Tensor | None = None,
    seed: int = 0,
    orthonormalize: str = "cholqr",
):
    """The extension's batched algorithm in PyTorch; ``a`` is ``(b, m, n)``. Returns ``(U, S, V, info)``."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    householder = orthonormalize == "householder"
    mat = a.detach().to(compute)
    basis = None if project_out is None or project_out.shape[-1] == 0 else project_out.detach().to(compute)
    b, m, n = mat.shape
    mn = min(m, n)
    width = min(rank + oversample, mn)
    info = torch.zeros(b, dtype=torch.int32, device=a.device)

    def project(y):
        return y if basis is None else torch.baddbmm(y, basis, basis.mT @ y, alpha=-1)

    def times(x):  # Â·x
        return project(mat @ x.to(compute))

    def t_times(y):  # Âᵀ·y
        return mat.mT @ project(y.to(compute))

    def orth(y, want_r=False, intermediate=False):
        nonlocal info
        q, r, flags = _orthonormalize(y, compute, householder, want_r, intermediate)
        info |= flags
        return q, r

    if width < mn:  # every basis but the last only feeds the next product: one shifted pass (csrc/rsvd.cpp)
        omega = gaussian_sketch(seed, n, width, device=a.device, dtype=compute)
        q = orth(project(mat @ omega.to(compute)), intermediate=power_iters > 0)[0]
        for it in range(power_iters):
            z = orth(t_times(q), intermediate=True)[0]
            q = orth(times(z), intermediate=it + 1 < power_iters)[0]
    elif n <= m:
        q = orth(project(mat))[0]
    else:
        q = torch.eye(m, dtype=torch.float64, device=a.device).expand(b, m, m)
    q2, r = orth(t_times(q), want_r=True)
    u_small, s, vh_small = torch.linalg.svd(r.mT, full_matrices=False)
    u = (q @ u_small[..., :rank]).to(compute)
    v = (q2 @ vh_small.mT[..., :rank]).to(compute)
    return u, s[..., :rank].to(compute), v, info


def rsvd_extension(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 4,
    project_out: torch.Tensor | None = None,
    seed: int = 0,
):
    """``torch.ops.keeplora.rsvd`` (C++/CUDA); same arguments and results as :func:`rsvd`."""
    squeeze = a.dim() == 2
    mat = _as_batch(a).detach()
    basis = _as_batch(project_out)
    basis = None if basis is None else basis.detach()
    u, s, v, _info = torch.ops.keeplora.rsvd(mat, rank, oversample, power_iters, basis, int(seed))
    if squeeze:
        u, s, v = u[0], s[0], v[0]
    return u, s, v


def _rsvd_fallback(a, rank, *, oversample, power_iters, project_out, seed):
    squeeze = a.dim() == 2
    u, s, v, _info = rsvd_torch(
        _as_batch(a),
        rank,
        oversample=oversample,
        power_iters=power_iters,
        project_out=_as_batch(project_out),
        seed=seed,
    )
    if squeeze:
        u, s, v = u[0], s[0], v[0]
    return u, s, v


def _check_rsvd_args(a, rank, oversample, power_iters, project_out) -> None:
    if a.dim() not in (2, 3):
        raise ValueError(f"rsvd: a must be (m, n) or (b, m, n), got shape {tuple(a.shape)}")
    m, n = a.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rsvd: rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"rsvd: oversample and power_iters must be ≥ 0, got {oversample} and {power_iters}")
    if project_out is not None and (project_out.dim() != a.dim() or project_out.shape[-2] != m):
        raise ValueError(
            f"rsvd: project_out must have {m} rows and the same batch layout as a, "
            f"got {tuple(project_out.shape)} for a of shape {tuple(a.shape)}"
        )


def _rsvd_callable(backend: str, rank: int, oversample: int, power_iters: int, seed: int):
    """``(a, project_out) -> (U, S, V)`` on ``backend`` with the other arguments fixed (what a graph captures)."""
    impl = _dispatch.implementation("rsvd", backend)

    def call(a, project_out):
        return impl(a, rank, oversample=oversample, power_iters=power_iters, project_out=project_out, seed=seed)

    return call


def rsvd_graph_entry(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 4,
    project_out: torch.Tensor | None = None,
    seed: int = 0,
    cache=None,
):
    """The :class:`~keeplora_kernels.graphs.GraphedCall` that ``rsvd(..., graph=True)`` replays for these shapes and
    arguments (captured now if it is not cached). Its ``inputs`` are the static ``(a, project_out)`` buffers: a
    caller that writes its batch into them (e.g. ``torch.stack(mats, out=entry.inputs[0])``) and calls
    ``entry(*entry.inputs)`` skips the input copy. ``graphed``/``reason`` say whether a graph replays."""
    from . import graphs

    _check_rsvd_args(a, rank, oversample, power_iters, project_out)
    backend = _dispatch.select("rsvd", a.device)
    cache = graphs.default_cache if cache is None else cache
    inputs = (a.detach(), None if project_out is None else project_out.detach())
    small = small_svd_method() if backend == "extension" else ""  # baked into the graph like the other arguments
    return cache.entry(
        "rsvd",
        _rsvd_callable(backend, rank, oversample, power_iters, int(seed)),
        inputs,
        (backend, rank, oversample, power_iters, int(seed), small),
    )


def rsvd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iters: int = 4,
    project_out: torch.Tensor | None = None,
    seed: int = 0,
    graph: bool = False,
):
    """Top-``rank`` SVD ``a ≈ U·diag(S)·Vᵀ`` of ``a`` or, with ``project_out=P``, of ``(I − P·Pᵀ)·a``.

    Args:
        a: ``(m, n)`` or ``(b, m, n)``; bf16/fp16/fp32 are computed in fp32, fp64 in fp64.
        rank: number of singular triplets, ``1 ≤ rank ≤ min(m, n)``.
        oversample: extra sketch columns (sketch width ``rank + oversample``, capped at ``min(m, n)``; at the cap the
            exact SVD is used).
        power_iters: subspace iterations; each sharpens the spectrum by one power of ``S²``.
        project_out: optional ``(m, k)`` or ``(b, m, k)`` orthonormal basis P to project out of the column space.
        seed: the Gaussian sketch's seed; equal seeds give equal results.
        graph: replay a CUDA graph of the whole call (captured on the first call with these shapes, dtypes, device
            and arguments; :mod:`keeplora_kernels.graphs`): one host launch instead of one per kernel. The inputs
            are copied into the graph's static buffers (:func:`rsvd_graph_entry` avoids that copy). Results equal
            the eager call's; CPU tensors, or a path that cannot be captured, run eagerly
            (``keeplora_kernels.graphs.default_cache.reasons`` says why).

    Returns ``U (…, m, rank)``, ``S (…, rank)`` descending, ``V (…, n, rank)`` in the compute dtype.

    All matrices of a batch share one Gaussian sketch (a pure function of ``seed``, the same on CPU and CUDA).
    Zero columns in ``project_out`` (padding to a common k) do not change the result. Singular directions of an
    exactly rank-deficient ``Â`` may come back as zero columns of U with S = 0 on CUDA (never arbitrary
    directions); on the CPU such blocks are redone with Householder QR (see csrc/README.md).
    Backends: the C++/CUDA extension when built, else :func:`rsvd_torch` (same algorithm in PyTorch).
    """
    if graph:
        entry = rsvd_graph_entry(
            a, rank, oversample=oversample, power_iters=power_iters, project_out=project_out, seed=seed
        )
        return entry(a.detach(), None if project_out is None else project_out.detach())
    _check_rsvd_args(a, rank, oversample, power_iters, project_out)
    backend = _dispatch.select("rsvd", a.device)
    return _rsvd_callable(backend, rank, oversample, power_iters, seed)(a, project_out)
