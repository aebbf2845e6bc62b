"""The device side of the MQTT protocol: topics, the uplink envelope, and PUBACK handling.

Each device has its own key and certificate, connects with clean_start false and a session
expiry, publishes JSON telemetry at QoS 1 to `devices/<id>/telemetry` with its own growing
sequence number, and now and then an event to `devices/<id>/events`. A message is kept until
its PUBACK (gmqtt's store, replayed on reconnect); while offline, new messages wait in the
device's FIFO outbox. A PUBACK with reason 0x10 (no matching subscribers: Mosquitto's answer
while no bridge subscription exists, e.g. after a broker restart until the bridges subscribe
again) is not a delivery: the message stays stored and is sent again after a bounded backoff.
A refusal (reason >= 0x80, e.g. 0x95 over the broker's size limit) ends the message, counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import Callable
from typing import Any, NoReturn

import gmqtt

SESSION_EXPIRY_S = 3600
# Uplink kinds (`devices/<id>/<kind>`) and the downlink topics a device subscribes to.
TELEMETRY = "telemetry"
EVENTS = "events"
STATE_REPORTED = "state/reported"
STATE_DESIRED = "state/desired"
OTA_COMMAND = "ota/command"
OTA_STATUS = "ota/status"
# PUBACK reason codes (MQTT 5 §3.4.2.1): 0x10 means the broker took the message but nobody was
# subscribed, so nothing will deliver it; >= 0x80 is a refusal.
NO_MATCHING_SUBSCRIBERS = 0x10
REFUSED = 0x80
RETRY_FIRST_S = 0.2  # backoff after a 0x10 answer: doubles per answer, up to RETRY_MAX_S
RETRY_MAX_S = 5.0


def no_json_constant(name: str) -> NoReturn:
    """json.loads' ``parse_constant``: NaN and Infinity are refused (a report carrying them
    would not be JSON for the bridge)."""
    raise ValueError(f"{name} is not JSON")


def build_message(
    device_id: str, kind: str, seq: int, ts_ms: int, body: dict[str, Any]
) -> tuple[str, bytes]:
    """(topic, payload) of an uplink: the envelope (`seq`, `ts`) and the kind's fields."""
    payload = {"seq": seq, "ts": ts_ms, **body}
    return f"devices/{device_id}/{kind}", json.dumps(payload).encode()


def parse_puback(packet: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK's variable header; no code means success (§3.4.2.1)."""
    (mid,) = struct.unpack("!H", packet[:2])
    return mid, packet[2] if len(packet) > 2 else 0


def retry_delay(answers: int, jitter: float = 1.0) -> float:
    """Seconds before sending again a message answered 0x10 ``answers`` times (1, 2, ...):
    doubling from RETRY_FIRST_S, never above RETRY_MAX_S; ``jitter`` in (0, 1] spreads a fleet
    that all got 0x10 at once."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2.0 ** min(answers - 1, 16)) * jitter


class AckCountingClient(gmqtt.Client):  # type: ignore[misc]
    """gmqtt 0.8 ignores a PUBACK's reason code and drops the stored QoS 1 message on any PUBACK.
    This one reads it: on 0x10 the message stays stored (and its packet id taken) and is sent
    again after :func:`retry_delay`; any other code ends it. Every code goes to ``on_puback``."""

    def __init__(self, client_id: str, on_puback: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(client_id, **kwargs)
        self._on_puback = on_puback
        self._answers: dict[int, int] = {}  # packet id -> 0x10 answers so far
        self._jitter = random.Random()  # not the device's rng: its readings stay reproducible
        handler = self._package_handler
        self._plain_puback = handler._handle_puback_packet
        # gmqtt finds a packet's handler by name on the handler instance.
        handler._handle_puback_packet = self._handle_puback

    async def _wait_qos_queue_drained(self) -> None:
        """gmqtt's connect() waits here until every stored message is acknowledged: with 0x10
        answers kept for a retry, that lasts as long as no bridge subscribes, and the device
        would never get past connect. The device's drain() waits for its messages instead."""

    def _handle_puback(self, cmd: int, packet: bytes) -> None:
        mid, reason = parse_puback(packet)
        if reason == NO_MATCHING_SUBSCRIBERS and self._stored(mid) is not None:
            answers = self._answers.get(mid, 0) + 1
            self._answers[mid] = answers
            delay = retry_delay(answers, self._jitter.uniform(0.5, 1.0))
            asyncio.get_running_loop().call_later(delay, self._resend, mid, self._connection)
        else:
            self._answers.pop(mid, None)
            self._plain_puback(cmd, packet)  # frees the id, drops the stored message
        self._on_puback(reason)

    def _stored(self, mid: int) -> bytes | None:
        for stored_mid, package in self._persistent_storage.get_all():
            if stored_mid == mid:
                return bytes(package)
        return None

    def _resend(self, mid: int, connection: Any) -> None:
        # After a reconnect gmqtt replays every stored message itself: resend only on the
        # connection that answered 0x10, or the message would go out twice.
        if connection is not self._connection or not self.is_connected:
            return
        package = self._stored(mid)
        if package is not None:
            connection.send_package(package)
