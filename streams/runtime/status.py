"""Status files: a platform process writes its counters as JSON; `fleet status` reads them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file. The temporary name is the writer's own, so
    two writers of one status file (a service and a test's in-process twin) never trip over
    each other's rename: the last one wins, whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
