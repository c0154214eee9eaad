"""Raw data sources of the embedded benchmark: pinned artifacts, fetched from the package registries, verified,
unpacked into a cache folder.

Every artifact is pinned by name, version and the sha256 of the downloaded file (measured when the manifest was
written). Debian packages are fetched with ``apt-get download NAME=VERSION`` and unpacked with ``dpkg-deb -x`` into
the cache (no root install, no dependencies pulled); the vaderSentiment corpora come from its PyPI *source*
distribution (the wheel lacks them), fetched with ``pip download --no-binary :all: --no-deps``.

Cache layout (``$KEEPLORA_CACHE``, default ``~/.cache/keeplora``)::

    downloads/<file as downloaded>       the artifact, verified against the manifest's sha256
    sources/<name>-<version>/            the unpacked tree (a ``.complete`` stamp marks a finished unpack)
    processed/<task>-<key>/              processed task splits (JSONL, see ``tasks.py``)

A source that is not in the cache raises :class:`SourceMissing`, whose message names the exact command to run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Artifact",
    "MANIFEST",
    "SourceMissing",
    "ChecksumMismatch",
    "cache_dir",
    "fetch",
    "fetch_command",
    "source_root",
    "source_status",
    "sha256_file",
]


@dataclass(frozen=True)
class Artifact:
    """One pinned upstream artifact."""

    name: str  # package name in its registry
    kind: str  # "deb" (Debian binary package) | "sdist" (PyPI source distribution)
    version: str
    sha256: str  # of the downloaded file
    size: int  # bytes, for the status listing
    purpose: str

    @property
    def key(self) -> str:
        """Folder name of the unpacked tree: name and version, filesystem-safe (Debian epochs use ':')."""
        return f"{self.name}-{self.version.replace(':', '_')}"


# sha256 measured on the downloaded files (Debian bookworm, 2026-11-28; the sdist from PyPI).
MANIFEST: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact(
            "wordnet-base",
            "deb",
            "1:3.0-37",
            "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
            6467132,
            "WordNet 3.0 database: noun/verb glosses with lexicographer-file (supersense) labels",
        ),
        Artifact(
            "fortunes",
            "deb",
            "1:1.99.1-7.3",
            "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            848988,
            "English fortune cookies by topic file",
        ),
        Artifact(
            "fortunes-de",
            "deb",
            "0.35-1",
            "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0",
            904952,
            "German fortunes",
        ),
        Artifact(
            "fortunes-es",
            "deb",
            "1.36",
            "54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899",
            317920,
            "Spanish fortunes",
        ),
        Artifact(
            "fortunes-it",
            "deb",
            "1.99-4.1",
            "675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e",
            522292,
            "Italian fortunes",
        ),
        Artifact(
            "fortunes-ru",
            "deb",
            "1.52-3.1",
            "2dc76af9c0e02e2926d36f88dcb685bb171fab8677e553a6def41efe8a551cc6",
            729496,
            "Russian fortunes",
        ),
        Artifact(
            "fortunes-pl",
            "deb",
            "0.0.20130525-3",
            "39602aece2081a67c9e95ff7f6e8b0b8fc2cce971e920a31d04133d4ac007ad0",
            760160,
            "Polish fortunes",
        ),
        Artifact(
            "r-cran-janeaustenr",
            "deb",
            "1.0.0-1",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            1626392,
            "Jane Austen's six novels (R lazy-load database)",
        ),
        Artifact(
            "vaderSentiment",
            "sdist",
            "3.3.2",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            2466783,
            "VADER ground-truth sentiment corpora (tweets, movie/Amazon reviews, NYT editorials)",
        ),
    ]
}


class SourceMissing(RuntimeError):
    """A raw source is not in the cache; the message names the command that fetches it."""


class ChecksumMismatch(RuntimeError):
    """A downloaded artifact does not match the manifest's sha256."""


def cache_dir(cache: os.PathLike | str | None = None) -> Path:
    """The data cache: ``cache`` if given, else ``$KEEPLORA_CACHE``, else ``~/.cache/keeplora``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("KEEPLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "keeplora"


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _artifact(name: str) -> Artifact:
    try:
        return MANIFEST[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(sorted(MANIFEST))}") from None


def fetch_command(name: str, cache: os.PathLike | str | None = None) -> str:
    """The one command that fetches and unpacks ``name`` into the cache (what error messages tell users to run)."""
    flag = f" --cache {cache_dir(cache)}" if cache is not None else ""
    return f"keeplora data fetch {name}{flag}"


def raw_download_command(name: str) -> list[str]:
    """The registry client call that downloads the artifact into the current folder."""
    a = _artifact(name)
    if a.kind == "deb":
        return ["apt-get", "download", f"{a.name}={a.version}"]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        f"{a.name}=={a.version}",
        "-d",
        ".",
    ]


def source_root(name: str, cache: os.PathLike | str | None = None) -> Path:
    """The unpacked tree of ``name``; raises :class:`SourceMissing` (naming the command to run) if absent."""
    a = _artifact(name)
    root = cache_dir(cache) / "sources" / a.key
    if not (root / ".complete").is_file():
        raise SourceMissing(
            f"data source {a.name} {a.version} ({a.purpose}) is not in the cache {cache_dir(cache)}.\n"
            f"  Run: {fetch_command(name, cache)}\n"
            f"  (or all sources at once: keeplora data fetch; it runs `{' '.join(raw_download_command(name)[:4])} ...` "
            f"and unpacks into the cache)"
        )
    return root


def source_status(cache: os.PathLike | str | None = None) -> list[dict]:
    rows = []
    for name, a in MANIFEST.items():
        root = cache_dir(cache) / "sources" / a.key
        rows.append(
            {
                "name": name,
                "version": a.version,
                "kind": a.kind,
                "bytes": a.size,
                "cached": (root / ".complete").is_file(),
                "path": str(root),
            }
        )
    return rows


Runner = Callable[[Sequence[str], Path], None]


def _run(cmd: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ""
        if cmd[0] == "apt-get":
            hint = "\n  (if apt reports no candidate, its package lists may be missing: run `apt-get update` first)"
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}:\n"
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}{hint}"
        )


def _find_download(folder: Path, a: Artifact) -> Path:
    if a.kind == "deb":
        hits = sorted(folder.glob(f"{a.name}_*.deb"))
    else:
        hits = sorted(
            p
            for p in folder.iterdir()
            if p.name.lower().startswith(f"{a.name.lower()}-{a.version}") and p.name.endswith((".tar.gz", ".zip"))
        )
    if len(hits) != 1:
        raise RuntimeError(f"expected one downloaded file for {a.name} in {folder}, found {[p.name for p in hits]}")
    return hits[0]


def _unpack(a: Artifact, archive: Path, dest: Path) -> None:
    if a.kind == "deb":
        if shutil.which("dpkg-deb") is None:
            raise RuntimeError("dpkg-deb is needed to unpack Debian packages (Debian/Ubuntu: package dpkg)")
        _run(["dpkg-deb", "-x", str(archive), str(dest)], dest)
    else:
        with tarfile.open(archive) as tf:
            safe_extract(tf, dest)


def safe_extract(tf: tarfile.TarFile, dest: Path) -> None:
    """Extract a tar archive refusing members that would land outside ``dest`` (absolute paths, ``..``, links)."""
    dest = Path(dest).resolve()
    for m in tf.getmembers():
        target = (dest / m.name).resolve()
        if dest not in target.parents and target != dest:
            raise RuntimeError(f"refusing to extract {m.name!r}: outside {dest}")
        if m.issym() or m.islnk():
            raise RuntimeError(f"refusing to extract link {m.name!r}")
    try:
        tf.extractall(dest, filter="data")
    except TypeError:  # Python < 3.10.12 / 3.11.4 has no extraction filters; members were checked above
        tf.extractall(dest)


def fetch(
    names: Iterable[str] | None = None,
    cache: os.PathLike | str | None = None,
    *,
    runner: Runner = _run,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Download (if needed), verify and unpack the named sources (all by default); returns their unpacked roots.

    Idempotent: a source already unpacked is left alone, a verified download is not fetched again. A download whose
    sha256 differs from the manifest is deleted and reported (:class:`ChecksumMismatch`), never used.
    """
    base = cache_dir(cache)
    roots = []
    for name in list(names) if names else list(MANIFEST):
        a = _artifact(name)
        root = base / "sources" / a.key
        if (root / ".complete").is_file():
            roots.append(root)
            continue
        downloads = base / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
            tmp_path = Path(tmp)
            existing = [p for p in downloads.iterdir() if p.is_file()]
            cached = [p for p in existing if _matches(p, a)]
            if cached:
                archive = cached[0]
            else:
                cmd = raw_download_command(name)
                log(f"[keeplora] fetching {a.name} {a.version}: {' '.join(cmd)}")
                runner(cmd, tmp_path)
                got = _find_download(tmp_path, a)
                digest = sha256_file(got)
                if digest != a.sha256:
                    got.unlink()
                    raise ChecksumMismatch(f"{a.name} {a.version}: sha256 {digest} != pinned {a.sha256}")
                archive = downloads / got.name
                os.replace(got, archive)
            staging = Path(tempfile.mkdtemp(dir=downloads, prefix=".unpack-"))
            try:
                _unpack(a, archive, staging)
                if root.exists():
                    shutil.rmtree(root)
                root.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, root)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
            (root / ".complete").write_text(f"{a.name} {a.version} {a.sha256}\n")
        log(f"[keeplora] {a.name} {a.version} ready in {root}")
        roots.append(root)
    return roots


def _matches(path: Path, a: Artifact) -> bool:
    prefix = f"{a.name}_" if a.kind == "deb" else f"{a.name}-{a.version}"
    if not path.name.startswith(prefix) or path.stat().st_size != a.size:
        return False
    return sha256_file(path) == a.sha256
