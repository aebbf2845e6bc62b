"""Files written whole (streams/runtime/files.py)."""

from __future__ import annotations

import stat
from pathlib import Path

from streams.runtime.files import atomic_write, create_once


def test_atomic_write_replaces_the_file_with_its_mode_and_leaves_no_temp_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "ca.key"
    atomic_write(target, b"old")
    atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ca.key"]


def test_create_once_keeps_the_first_content_and_says_when_it_lost(tmp_path: Path) -> None:
    target = tmp_path / "signing.key"
    assert create_once(target, b"first", mode=0o600)
    assert not create_once(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["signing.key"]
