"""Running the `fleet` command line against the test stack, as a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infra.settings import PROJECT_ROOT, Settings
from tests.conftest import settings_env

FLEET = str(PROJECT_ROOT / ".venv" / "bin" / "fleet")


def fleet_cli(
    settings: Settings, *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`fleet ARGS...` pointed at the stack of ``settings``; its exit code and text output."""
    return subprocess.run(
        [FLEET, *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
