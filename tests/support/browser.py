"""Debian's Chromium, headless, for tests that look at a page as a person would: its DOM after
the scripts ran, or a screenshot."""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from infra.settings import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium(
    url: str,
    profile: Path,
    *mode: str,
    wait_ms: int = 5_000,
    size: str = "1400,1250",
    timeout_s: float = 60.0,
    attempts: int = 3,
) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``url``: it lets the page run for ``wait_ms`` of virtual
    time (which stands still while a request is under way), then dumps the DOM
    (``--dump-dom``) or takes a screenshot (``--screenshot=FILE``), as ``mode`` says.

    Each run has a profile of its own beside ``profile``: a run on the profile of a browser
    that has not quite ended can wait forever (a hung run seen here sent no request at all),
    and what is left of a run is killed when it ends. A run that still outlives ``timeout_s``
    is killed with its child processes and tried again, up to ``attempts`` runs."""
    for attempt in range(1, attempts + 1):
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={profile}-{uuid.uuid4().hex[:8]}",
            f"--window-size={size}", f"--virtual-time-budget={wait_ms}", *mode, url,
        ]  # fmt: skip
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a hung run is killed whole
        ) as browser:
            try:
                out, err = browser.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.communicate()
                if attempt == attempts:
                    raise
                continue
            with contextlib.suppress(ProcessLookupError):  # helpers it left behind, if any
                os.killpg(browser.pid, signal.SIGKILL)
            return subprocess.CompletedProcess(command, browser.returncode, out, err)
    raise AssertionError("unreachable: the last attempt returns or raises")


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
