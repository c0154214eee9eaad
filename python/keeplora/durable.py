"""Crash-safe folders and files: what is on disk is always a whole previous or a whole new version, never a mix.

A folder is written into a temporary sibling (``.<name>.tmp-*``); every file in it is fsynced, a manifest
(``manifest.json``: each file's size and sha256) is written and fsynced, the folder itself is fsynced, and only then
is it renamed into place:

1. an existing ``<name>`` is renamed to ``.<name>.old`` (the parent directory is fsynced),
2. the temporary folder is renamed to ``<name>`` (the parent is fsynced),
3. ``.<name>.old`` is removed (or kept as ``keep_previous``).

A process killed at any point leaves either ``<name>`` (old or new, complete) or, between steps 1 and 2, only
``.<name>.old``: :func:`readable_folder` then returns the previous state with a warning. Because the data reached
the disk before the renames, a power loss cannot leave a renamed folder of empty or partial files either.
:func:`verify` checks the manifest before anything is read, so a truncated, altered or missing file is reported by
name instead of being loaded. One writer per target folder at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A saved folder is damaged: a file is missing, has another size or checksum, or cannot be parsed."""


class UnverifiedWarning(UserWarning):
    """A folder was read without an integrity check (it was written before manifests existed)."""


# ----------------------------------------------------------------------------------------------- fsync
def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (created, renamed, removed names) durable; a no-op where directories cannot be
    opened (Windows)."""
    if os.name == "nt":  # pragma: no cover
        return
    fsync_file(path)


def replace_file(path: str | os.PathLike, text: str) -> None:
    """Replace one file atomically and durably: write a sibling of this writer's own (``.<name>.*.tmp``; writers
    that race on one target, e.g. runs building the same cached task, never rename each other's half-written
    file), fsync it, rename it over ``path``, fsync the directory. The last writer's bytes win."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _digest(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file read once; with ``sync`` the same descriptor is fsynced."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, sha.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


# ----------------------------------------------------------------------------------------------- manifest
def write_manifest(folder: str | os.PathLike) -> None:
    """Fsync every file under ``folder`` and record its size and sha256 in ``folder/manifest.json`` (fsynced)."""
    folder = Path(folder)
    entries = {}
    for path in _files(folder):
        size, sha = _digest(path, sync=True)
        entries[path.relative_to(folder).as_posix()] = {"size": size, "sha256": sha}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:  # the folder is not published yet: no rename needed
        f.write(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def verify(folder: str | os.PathLike) -> bool:
    """Check every file listed in ``folder``'s manifest (size, then sha256). Returns False when the folder has no
    manifest (written before manifests existed: nothing can be checked); raises :class:`IntegrityError` naming the
    first damaged file."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{path} is damaged ({error}); the folder cannot be verified") from None
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise IntegrityError(f"{file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(
                f"{file} is damaged: {size} bytes instead of the {entry['size']} written (truncated or overwritten)"
            )
        if _digest(file)[1] != entry["sha256"]:
            raise IntegrityError(f"{file} is damaged: its sha256 differs from the one recorded when it was written")
    return True


# ----------------------------------------------------------------------------------------------- writing
def old_folder(target: Path) -> Path:
    """Where a save keeps the previous version of ``target`` between its two renames."""
    return target.with_name(f".{target.name}.old")


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _fsync_tree(folder: Path) -> None:
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)
    fsync_dir(folder)


def _replace(tmp: Path, target: Path, keep_previous: Path | None) -> None:
    parent, old = target.parent, old_folder(target)
    if target.exists():
        # target is complete (it only ever appears by a rename), so a stale .old can go
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        fsync_dir(parent)
    # when target was missing, .old (if any) is the only complete state: it stays until the new one is in place
    os.replace(tmp, target)
    fsync_dir(parent)
    if old.exists():
        if keep_previous is not None:
            if keep_previous.exists():
                shutil.rmtree(keep_previous)
            os.replace(old, keep_previous)
        else:
            shutil.rmtree(old)
        fsync_dir(parent)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, keep_previous: str | os.PathLike | None = None) -> Iterator[Path]:
    """Write a folder crash-safely: yields an empty temporary folder to fill; on a normal exit it gets a manifest
    and replaces ``target`` (see the module docstring); on an exception it is removed and ``target`` is untouched.

    ``keep_previous``: a path (next to ``target``) where the replaced version is kept instead of being deleted.
    An ``OSError`` while writing (also one a serializer wraps in its own exception) is raised as an ``OSError`` of
    that kind, naming ``target``.
    """
    target = Path(target)
    previous = Path(keep_previous) if keep_previous is not None else None
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(_tmp_prefix(target) + "*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
        yield tmp
        write_manifest(tmp)
        _fsync_tree(tmp)
        _replace(tmp, target, previous)
    except OSError as error:
        _remove(tmp)
        raise _naming(error, target) from error
    except BaseException as error:
        _remove(tmp)
        os_error = _os_error_inside(error)
        if os_error is not None:
            raise _naming(os_error, target) from error
        raise


def _os_error_inside(error: BaseException) -> OSError | None:
    """The OS error a serializer reports in its own exception type (safetensors: "I/O error: ... (os error N)"),
    as an OSError, or None."""
    match = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(error))
    if match is None:
        return None
    return OSError(int(match.group(2)), match.group(1))


def _remove(tmp: Path | None) -> None:
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def _naming(error: OSError, target: Path) -> OSError:
    """The same kind of OSError, saying which save failed (the temporary name alone means nothing to the user)."""
    where = f" ({error.filename})" if error.filename else ""
    message = f"cannot save to {target}: {error.strerror or error}{where}"
    args = (error.errno, message) if error.errno is not None else (message,)
    try:
        return type(error)(*args)
    except TypeError:  # an OSError subclass with another constructor
        return OSError(*args)


# ----------------------------------------------------------------------------------------------- reading
def readable_folder(target: str | os.PathLike) -> Path:
    """The folder to read for ``target``: ``target`` itself, or — when a save was interrupted between its two
    renames, so that only the previous version exists — that previous version (with a warning)."""
    target = Path(target)
    old = old_folder(target)
    if not target.exists() and old.is_dir():
        warnings.warn(
            f"{target} is missing but {old} holds the previous state (a save into {target} was "
            "interrupted before it completed); reading the previous state",
            RecoveredWarning,
            stacklevel=2,
        )
        return old
    return target


class RecoveredWarning(UserWarning):
    """A folder was read from the previous version kept by an interrupted save."""


__all__ = [
    "IntegrityError",
    "MANIFEST",
    "RecoveredWarning",
    "UnverifiedWarning",
    "atomic_folder",
    "fsync_dir",
    "fsync_file",
    "old_folder",
    "readable_folder",
    "verify",
    "write_manifest",
]
