"""alert_webhooks: forwards ``alerts`` to HTTP endpoints configured per device group.

The endpoints are in this job's ``webhooks.json`` (streams/jobs/webhooks.py says its shape),
read again when it changes. Each group has its own queue and sender: an endpoint that is down
holds back its own group's alerts only. An alert's offset is committed once it is delivered or
parked (out-of-order acks are fine: Faust commits up to the first alert still pending), so a
crash sends again what was in flight, with the same ``Idempotency-Key``: at least once.
An alert still refused after its endpoint's ``max_attempts`` (or refused outright by a 4xx) is
parked on ``dlq.jobs.alert_webhooks`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import faust

from streams.jobs import app, topics
from streams.jobs.webhooks import (
    CONFIG_FILE,
    ConfigFile,
    Endpoint,
    backoff_s,
    outcome,
    post,
)

log = logging.getLogger(__name__)
QUEUE_SIZE = 1000  # per group; a full queue holds the agent back (and with it, its commits)

devices = app.devices
# <state_dir>/jobs/alert_webhooks/webhooks.json when run by `fleet up` or `fleet jobs run`.
config = ConfigFile((app.jobs_config.state_dir if app.jobs_config else Path()) / CONFIG_FILE)


class DeliveryFailed(Exception):
    """The reason an alert was parked: the endpoint's last answer or error."""


@dataclass(frozen=True)
class Delivery:
    event: faust.EventT[Any]
    alert: dict[str, Any]
    group: str
    endpoint: Endpoint


async def deliver(session: aiohttp.ClientSession, item: Delivery) -> None:
    """Send until delivered; raise DeliveryFailed once the endpoint's attempts are spent."""
    endpoint = item.endpoint
    for attempt in range(1, endpoint.max_attempts + 1):
        try:
            status = await post(session, endpoint, item.alert, item.group)
            result, reason = outcome(status), f"HTTP {status} from {endpoint.url}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            result, reason = "retry", f"{type(exc).__name__} {exc} from {endpoint.url}"
        if result == "delivered":
            return
        if result == "refused":
            raise DeliveryFailed(f"refused: {reason}")
        if attempt < endpoint.max_attempts:
            await asyncio.sleep(backoff_s(attempt, endpoint))
    raise DeliveryFailed(f"gave up after {endpoint.max_attempts} attempts: {reason}")


async def sender(session: aiohttp.ClientSession, queue: asyncio.Queue[Delivery]) -> None:
    """One group's sender: its alerts in order, each delivered or parked, then acked."""
    while True:
        item = await queue.get()
        try:
            await deliver(session, item)
        except DeliveryFailed as exc:
            log.warning("alert %s parked: %s", item.alert.get("alert_id"), exc)
            await app.dead_letter_message(item.event.message, exc)
        item.event.ack()


@app.agent(topics.alerts)
async def alert_webhooks(stream: faust.StreamT[Any]) -> None:
    queues: dict[str, asyncio.Queue[Delivery]] = {}
    senders: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as session:
        try:
            async for event in stream.noack().events():  # type: ignore[attr-defined]
                alert = event.value.asdict() if hasattr(event.value, "asdict") else event.value
                group = devices.group_of(alert["device_id"])
                endpoint = config.current().endpoints.get(group)
                if config.error:
                    log.warning("webhooks config: %s (using the last good one)", config.error)
                if endpoint is None:
                    event.ack()  # no endpoint for this group: nothing to deliver
                    continue
                queue = queues.get(group)
                if queue is None:
                    queue = queues[group] = asyncio.Queue(QUEUE_SIZE)
                    senders.append(asyncio.create_task(sender(session, queue)))
                await queue.put(Delivery(event, dict(alert), group, endpoint))
        finally:
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
