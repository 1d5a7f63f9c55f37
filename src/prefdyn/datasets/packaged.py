"""The original data sets packaged inside prefdyn, checked against their manifests before use.

Each packaged folder (``persona_original/``, ``hh_rlhf/``) holds the original files (gzipped,
content unchanged), their ``LICENSE``, a ``SOURCE.md`` (repository, commit, licence, attribution)
and a ``SHA256SUMS`` manifest in the format of ``sha256sum`` (``<hex digest>  <file name>`` per
line, so ``sha256sum -c SHA256SUMS`` checks the folder by hand too). :func:`verify_packaged`
checks every listed file against it once per process: a file is hashed again only when its
modification time or size changes. A missing, truncated or corrupted file raises
:class:`PackagedDataError` naming the file and how to restore it, before any work is done.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["MANIFEST", "PackagedDataError", "manifest_sha256", "read_manifest", "verify_packaged"]

MANIFEST = "SHA256SUMS"

_verified: dict[tuple[str, int, int], str] = {}   # (file, mtime_ns, size) -> SHA-256 that matched


class PackagedDataError(RuntimeError):
    """A file packaged with prefdyn is missing or differs from its manifest (a damaged install)."""


def _restore(path: Path) -> str:
    return (f"restore it: in a git clone of prefdyn run `git checkout -- {path}`; in an installed copy, reinstall "
            "prefdyn (`pip install --force-reinstall --no-deps` with the source you installed it from)")


def read_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: expected SHA-256}`` from the folder's ``SHA256SUMS``, in its order."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PackagedDataError(f"the manifest {path} of prefdyn's packaged data is missing; {_restore(path)}")
    entries = {}
    for lineno, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or "/" in name:
            raise PackagedDataError(f"{path}, line {lineno}: not '<sha256>  <file name>'; {_restore(path)}")
        entries[name] = digest
    return entries


def manifest_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 of the folder's ``SHA256SUMS`` file: one number that names every packaged file's content."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_packaged(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, str]:
    """Check the packaged files of ``folder`` (all of its manifest, or only ``names``) against the
    manifest and return ``{file name: SHA-256}`` of those checked.

    Raises :class:`PackagedDataError` for a file that is missing or whose SHA-256 differs (a
    truncated or corrupted copy), naming it and how to restore it. A file that passed is not hashed
    again in this process unless its modification time or size changed.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    unknown = [n for n in (names or []) if n not in manifest]
    if unknown:
        raise PackagedDataError(f"{', '.join(unknown)} not listed in {folder / MANIFEST}; "
                                "only the files the manifest lists are packaged with prefdyn")
    checked = {}
    for name in names if names is not None else manifest:
        path, expected = folder / name, manifest[name]
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise PackagedDataError(f"the packaged data file {path} is missing; {_restore(path)}") from None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if _verified.get(key) != expected:
            actual = _sha256(path)
            if actual != expected:
                raise PackagedDataError(
                    f"the packaged data file {path} is damaged ({stat.st_size} bytes, SHA-256 {actual[:12]}…, "
                    f"while {folder / MANIFEST} expects {expected[:12]}…; a truncated or altered copy); "
                    f"{_restore(path)}")
            _verified[key] = expected
        checked[name] = expected
    return checked
