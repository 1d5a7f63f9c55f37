"""Atomic writes and the on-disk cache location.

Every result and cache file of the book is written through :func:`atomic_write`: the bytes go to a
temporary file in the same folder, are flushed to disk, and then replace the target with
``os.replace``, which is atomic on POSIX and Windows. A run killed mid-write therefore leaves the
previous good file readable, never a truncated one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Serialise ``obj`` as indented JSON and write it atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cache_dir() -> Path:
    """Folder for caches shared by all chapters: ``$PREFDYN_CACHE`` or ``~/.cache/prefdyn``."""
    return Path(os.environ.get("PREFDYN_CACHE") or Path.home() / ".cache" / "prefdyn")
