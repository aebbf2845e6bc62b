"""Files written whole: a reader sees the old content or the new, never half of either (a
temp file next to the target, fsynced, then renamed or linked into place). Used for keys,
certificates and stored artifacts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _write_file(path: Path, data: bytes, mode: int) -> Path:
    """A complete temp file next to ``path`` (fsynced, with ``mode``); the caller moves it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` at once: readers see the old file or the new one."""
    tmp = _write_file(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_once(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create ``path`` with ``data`` unless it exists (atomic: a hard link, never a rename
    over another's file). False when it already existed."""
    tmp = _write_file(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
