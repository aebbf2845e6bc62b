"""Debian's Chromium, headless, for tests that look at a page as a person would: its DOM after
the scripts ran, or a screenshot."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

from infra.settings import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium(
    url: str, profile: Path, *mode: str, wait_ms: int = 5_000, size: str = "1400,1250"
) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``url``: it lets the page run for ``wait_ms`` of virtual
    time (which stands still while a request is under way), then dumps the DOM
    (``--dump-dom``) or takes a screenshot (``--screenshot=FILE``), as ``mode`` says."""
    return subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={size}", f"--virtual-time-budget={wait_ms}", *mode, url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def keep_for_docs(shot: Path, name: str) -> None:
    """Copy a screenshot to docs/ for the README, when FLEET_UPDATE_SCREENSHOTS=1."""
    if os.environ.get("FLEET_UPDATE_SCREENSHOTS") == "1":
        target = PROJECT_ROOT / "docs" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, target)


def visible_text(dom: str) -> str:
    """A dumped DOM's text as a reader sees it: no styles, scripts or tags, spaces collapsed."""
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))
