"""What a simulated fleet counts: every device adds to one FleetStats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FleetStats:
    devices: int = 0
    connected: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    events: int = 0
    desired_received: int = 0
    reported: int = 0
    ota_commands: int = 0  # commands taken up (not repeats, not malformed)
    ota_succeeded: int = 0  # installs and rollbacks that succeeded
    ota_failed: int = 0  # failed for another reason than a refused download
    ota_refused: int = 0  # downloads that failed verification (digest, signature, ...)
    no_subscribers: int = 0  # PUBACKs 0x10 (message kept, sent again later)
    refused: int = 0  # PUBACKs >= 0x80 (message dropped: retrying cannot help)
    bad_readings: int = 0  # readings made to fail the quality gate (bad_share)
    started_at: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "devices": self.devices,
            "connected": self.connected,
            "connect_failures": self.connect_failures,
            "published": self.published,
            "acked": self.acked,
            "events": self.events,
            "desired_received": self.desired_received,
            "reported": self.reported,
            "ota_commands": self.ota_commands,
            "ota_succeeded": self.ota_succeeded,
            "ota_failed": self.ota_failed,
            "ota_refused": self.ota_refused,
            "no_subscribers": self.no_subscribers,
            "refused": self.refused,
            "bad_readings": self.bad_readings,
            "elapsed_s": round(elapsed, 3),
            "publish_rate": round(self.published / elapsed, 1),
        }
