"""Data engineers' stream jobs: Faust agents on the platform's topics.

``from streams.jobs import app, topics`` in a job file; ``fleet jobs run FILE.py`` runs it.
"""

from __future__ import annotations

from streams.jobs.app import JobsApp, PlatformTopics
from streams.jobs.config import JobsConfig, TopicDecl
from streams.jobs.records import Alert, Device, DeviceEvent, Telemetry, TwinState, record_type

# Faust's contract: one app object job modules import and decorate (see streams/jobs/app.py).
app = JobsApp()
topics = PlatformTopics(app)

__all__ = [
    "Alert",
    "Device",
    "DeviceEvent",
    "JobsApp",
    "JobsConfig",
    "PlatformTopics",
    "Telemetry",
    "TopicDecl",
    "TwinState",
    "app",
    "record_type",
    "topics",
]
