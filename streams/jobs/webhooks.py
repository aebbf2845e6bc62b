"""Alert webhooks, the logic of the shipped job ``streams/jobs/shipped/alert_webhooks.py``.

Endpoints are configured per device group (``org/project/group``) in a JSON file, the job's
``webhooks.json`` (``<state_dir>/jobs/alert_webhooks/webhooks.json``), read again when it
changes::

    {"endpoints": {
        "acme/plant/g1": {"url": "https://hooks.example/fleet", "headers": {"X-Token": "..."},
                          "max_attempts": 8, "backoff_s": 0.5, "max_backoff_s": 30,
                          "timeout_s": 10}
    }}

Every alert of a configured group is POSTed as JSON, with header ``Idempotency-Key``: the
alert's id and its status (a raise and its resolve share the alert id), the same on every
attempt and every repeat after a crash. The parsing, the key, the body and the retry policy
are pure; :func:`post` is the one call that leaves the process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

CONFIG_FILE = "webhooks.json"
IDEMPOTENCY_HEADER = "Idempotency-Key"


class ConfigError(ValueError):
    """The webhooks file does not say what it should; the message says where."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    max_attempts: int = 8  # then the alert is parked on the job's dead-letter topic
    backoff_s: float = 0.5  # before the 2nd attempt; doubles each time
    max_backoff_s: float = 30.0
    timeout_s: float = 10.0


@dataclass(frozen=True)
class WebhookConfig:
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)  # group path -> endpoint


def parse_config(data: Any) -> WebhookConfig:
    """The config from the file's JSON; :class:`ConfigError` on anything unexpected."""
    if not isinstance(data, Mapping) or not isinstance(data.get("endpoints", {}), Mapping):
        raise ConfigError('expected {"endpoints": {"<org>/<project>/<group>": {"url": ...}}}')
    endpoints = {}
    for group, spec in data.get("endpoints", {}).items():
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("url"), str):
            raise ConfigError(f"endpoint of {group!r}: expected an object with a 'url'")
        if not spec["url"].startswith(("http://", "https://")):
            raise ConfigError(f"endpoint of {group!r}: url must be http(s)://")
        unknown = set(spec) - {"url", "headers", "max_attempts", "backoff_s", "max_backoff_s",
                               "timeout_s"}  # fmt: skip
        if unknown:
            raise ConfigError(f"endpoint of {group!r}: unknown keys {sorted(unknown)}")
        try:
            endpoint = Endpoint(
                url=spec["url"],
                headers={str(k): str(v) for k, v in dict(spec.get("headers", {})).items()},
                max_attempts=int(spec.get("max_attempts", 8)),
                backoff_s=float(spec.get("backoff_s", 0.5)),
                max_backoff_s=float(spec.get("max_backoff_s", 30.0)),
                timeout_s=float(spec.get("timeout_s", 10.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"endpoint of {group!r}: {exc}") from exc
        if endpoint.max_attempts < 1 or endpoint.backoff_s < 0 or endpoint.timeout_s <= 0:
            raise ConfigError(f"endpoint of {group!r}: max_attempts >= 1, timeouts > 0")
        endpoints[str(group)] = endpoint
    return WebhookConfig(endpoints)


class ConfigFile:
    """The webhooks file, read again when its modification time changes. A missing file is
    no endpoints; a broken one keeps the last good config (and says why in ``error``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._config = WebhookConfig()

    def current(self) -> WebhookConfig:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            self._stamp, self._config, self.error = None, WebhookConfig(), None
            return self._config
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._config, self.error = parse_config(json.loads(self.path.read_text())), None
            except (OSError, ValueError) as exc:
                self.error = f"{self.path}: {exc}"
        return self._config


def idempotency_key(alert: Mapping[str, Any]) -> str:
    """The alert id and status: the same on every attempt and every repeat."""
    return f"{alert['alert_id']}:{alert['status']}"


def request_body(alert: Mapping[str, Any], group: str) -> dict[str, Any]:
    """The JSON body POSTed: the Avro alert's fields and the device's group."""
    return {**dict(alert), "group": group}


def backoff_s(attempt: int, endpoint: Endpoint) -> float:
    """Wait after failed attempt number ``attempt`` (1-based): exponential, capped."""
    return float(min(endpoint.max_backoff_s, endpoint.backoff_s * 2 ** (attempt - 1)))


Outcome = Literal["delivered", "retry", "refused"]


def outcome(status: int) -> Outcome:
    """What an HTTP status means for the delivery: 2xx done; 408, 425, 429 and 5xx try again;
    any other answer refuses the alert (parked at once, retrying would not change it)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 425, 429) or status >= 500:
        return "retry"
    return "refused"


async def post(
    session: aiohttp.ClientSession, endpoint: Endpoint, alert: Mapping[str, Any], group: str
) -> int:
    """One attempt: POST the alert; the HTTP status (network errors raise aiohttp/OS errors)."""
    headers = {**endpoint.headers, IDEMPOTENCY_HEADER: idempotency_key(alert)}
    timeout = aiohttp.ClientTimeout(total=endpoint.timeout_s)
    async with session.post(
        endpoint.url, json=request_body(alert, group), headers=headers, timeout=timeout
    ) as response:
        await response.read()
        return response.status
