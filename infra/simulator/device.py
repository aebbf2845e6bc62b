"""One simulated device: its sensors, its MQTT client and outbox, its twin and its updates.

The protocol (topics, envelope, PUBACK handling) is infra.simulator.protocol's, the twin's
rules infra.simulator.twin's, the OTA commands and slots infra.simulator.ota's; this module
puts them together on one gmqtt client, and keeps the sequence numbers (`<id>.seq.json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from infra.provision import DeviceCredentials
from infra.settings import Settings
from infra.simulator.ota import (
    DOWNLOAD_FAILED,
    DOWNLOADING,
    FAILED,
    INSTALL_ERROR,
    INSTALLING,
    KIND_MISMATCH,
    NO_ARTIFACT_STORE,
    NO_KEPT_IMAGE,
    NO_RELEASE_KEY,
    OTA_STEP_S,
    REFUSALS,
    REPORTED_VERSION_KEYS,
    SUCCEEDED,
    VERIFYING,
    VERSION_MISMATCH,
    ImageSlots,
    InstallCommand,
    OtaCommand,
    OtaState,
    RollbackCommand,
    artifact_file,
    image_path,
    initial_ota,
    parse_ota_command,
    read_image,
    save_ota,
    status_body,
    versions_reported,
    write_atomically,
)
from infra.simulator.protocol import (
    EVENTS,
    NO_MATCHING_SUBSCRIBERS,
    OTA_COMMAND,
    OTA_STATUS,
    REFUSED,
    SESSION_EXPIRY_S,
    STATE_DESIRED,
    STATE_REPORTED,
    TELEMETRY,
    AckCountingClient,
    build_message,
)
from infra.simulator.stats import FleetStats
from infra.simulator.twin import (
    FIRMWARE_VERSION,
    LocalTwin,
    apply_desired,
    initial_reported,
    merge_reported,
    parse_desired,
    save_twin,
)
from ingest.mqtt_client import client_tls_context
from streams.ota.artifacts import verify_download

log = logging.getLogger("fleetstream.simulator")


@dataclass
class SensorModel:
    """Plausible readings: a daily temperature wave, slow battery drain, some drifting or
    failing devices (a drifting sensor warms steadily; a failing one vibrates and drains)."""

    base_temperature: float
    base_humidity: float
    battery: float
    drifting: bool
    failing: bool

    @classmethod
    def sample(cls, rng: random.Random) -> SensorModel:
        return cls(
            base_temperature=rng.uniform(18.0, 26.0),
            base_humidity=rng.uniform(35.0, 60.0),
            battery=rng.uniform(60.0, 100.0),
            drifting=rng.random() < 0.05,
            failing=rng.random() < 0.02,
        )

    def reading(self, rng: random.Random, seq: int, now_s: float) -> dict[str, float]:
        wave = 2.0 * math.sin(now_s / 3600.0 * 2 * math.pi / 24)
        drift = 0.05 * seq if self.drifting else 0.0
        self.battery = max(0.0, self.battery - (0.05 if self.failing else 0.001))
        vibration = rng.gauss(0.8, 0.1) * (6.0 if self.failing else 1.0)
        return {
            "temperature": round(self.base_temperature + wave + drift + rng.gauss(0, 0.2), 3),
            "humidity": round(min(100.0, max(0.0, self.base_humidity + rng.gauss(0, 1.0))), 3),
            "battery": round(self.battery, 3),
            "vibration_rms": round(abs(vibration), 4),
        }


BAD_HUMIDITY = 180.0  # outside the quality rules' humidity range (sinks/quality/rules.toml)


class SimulatedDevice:
    def __init__(
        self,
        creds: DeviceCredentials,
        settings: Settings,
        stats: FleetStats,
        rng: random.Random,
        last_seq: dict[str, int] | None = None,
        twin: LocalTwin | None = None,
        report_interval_s: float = 1.0,
        *,
        ota: OtaState | None = None,
        artifact_root: Path | None = None,
        release_public_key: bytes | None = None,
        ota_fail_rate: float = 0.0,
        ota_step_s: float = OTA_STEP_S,
        bad_share: float = 0.0,
    ) -> None:
        self.creds = creds
        self.settings = settings
        self.stats = stats
        self.rng = rng
        self.model = SensorModel.sample(rng)
        # Drawn only when failures are injected: the readings stay those of earlier runs.
        self.ota_faulty = ota_fail_rate > 0 and rng.random() < ota_fail_rate
        # A share of readings made bad for the quality gate (a humidity sensor reading past
        # 100 %), drawn from a generator of their own: the other readings stay as they were.
        self.bad_share = bad_share
        self.bad_rng = random.Random(f"{creds.device_id}/bad")
        # A device's sequence numbers only grow, across runs too: they continue from disk.
        self.seq = {TELEMETRY: 0, EVENTS: 0, STATE_REPORTED: 0, OTA_STATUS: 0, **(last_seq or {})}
        self.twin = twin or LocalTwin(initial_reported(report_interval_s))
        if ota is None:  # no update yet: the twin's firmware is the one in slot A
            firmware = self.twin.reported.get("firmware")
            ota = initial_ota(firmware if isinstance(firmware, str) else FIRMWARE_VERSION)
        else:  # the slots are the truth (a kill may have come between their save and the twin's)
            self.twin = LocalTwin(
                merge_reported(self.twin.reported, versions_reported(ota)), self.twin.version
            )
        self.ota = ota
        self.artifact_root = artifact_root
        self.release_public_key = release_public_key
        self.ota_step_s = ota_step_s
        self._ota_lock = asyncio.Lock()  # one command at a time, in arrival order
        self._ota_tasks: set[asyncio.Task[None]] = set()
        self._ota_under_way: set[str] = set()  # command ids taken up, not yet handled
        self.outbox: deque[tuple[str, bytes]] = deque()
        self.sent: list[tuple[str, int]] = []  # (kind, seq) handed to the broker, in order
        self.client = AckCountingClient(
            creds.device_id,
            on_puback=self._puback,
            clean_session=False,
            session_expiry_interval=SESSION_EXPIRY_S,
        )
        self._desired_topic = f"devices/{creds.device_id}/{STATE_DESIRED}"
        self._desired_sub: gmqtt.Subscription | None = None
        self._ota_topic = f"devices/{creds.device_id}/{OTA_COMMAND}"
        self._ota_sub: gmqtt.Subscription | None = None
        # Set before connecting: a persistent session may deliver queued deltas at once.
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    @property
    def device_id(self) -> str:
        return self.creds.device_id

    def _puback(self, reason: int) -> None:
        if reason == NO_MATCHING_SUBSCRIBERS:
            self.stats.no_subscribers += 1  # kept: the client sends it again
        elif reason >= REFUSED:
            self.stats.refused += 1
            log.warning("%s: a message was refused by the broker (0x%02x)", self.device_id, reason)
        else:
            self.stats.acked += 1

    def tls(self) -> ssl.SSLContext:
        return client_tls_context(self.creds.ca_path, self.creds.cert_path, self.creds.key_path)

    async def connect(self) -> bool:
        try:
            await self.client.connect(
                self.settings.host,
                self.settings.mqtt_port,
                ssl=self.tls(),
                version=MQTTv50,
                keepalive=60,
            )
        except (TimeoutError, OSError, ssl.SSLError):
            self.stats.connect_failures += 1
            return False
        self.stats.connected += 1
        return True

    def _message(self, kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
        self.seq[kind] += 1
        self.sent.append((kind, self.seq[kind]))
        return build_message(self.device_id, kind, self.seq[kind], int(time.time() * 1000), body)

    def queue_telemetry(self) -> None:
        reading = self.model.reading(self.rng, self.seq[TELEMETRY] + 1, time.time())
        if self.bad_share > 0 and self.bad_rng.random() < self.bad_share:
            reading["humidity"] = BAD_HUMIDITY
            self.stats.bad_readings += 1
        self.outbox.append(self._message(TELEMETRY, reading))
        self.stats.published += 1
        if self.rng.random() < 0.02:
            event = {"type": "status", "attributes": {"battery": str(reading["battery"])}}
            self.outbox.append(self._message(EVENTS, event))
            self.stats.events += 1

    def queue_reported(self, reported: dict[str, Any]) -> None:
        """A reported patch (or the whole document) into the outbox, after what is queued
        (serialized at once: later changes to `reported` do not reach the message)."""
        self.outbox.append(self._message(STATE_REPORTED, {"reported": reported}))
        self.stats.reported += 1

    def _flush_soon(self) -> None:
        """Flush on the next loop turn, not inside gmqtt's packet handler: after a reconnect's
        CONNACK gmqtt schedules the replay of unacknowledged messages, and what the device
        queues now must follow them (FIFO)."""
        asyncio.get_running_loop().call_soon(self.flush_outbox)

    def _on_connect(
        self, client: gmqtt.Client, session_present: int, rc: int, properties: Any
    ) -> None:
        """Every successful CONNACK (first connect and gmqtt's reconnects): subscribe to the
        desired and OTA command topics, then report the whole document once so the platform
        can answer with a delta. Subscribing again is harmless if the session kept the
        subscriptions, and needed if the broker lost them."""
        if self._desired_sub is None or self._ota_sub is None:
            self._desired_sub = gmqtt.Subscription(self._desired_topic, qos=1)
            self._ota_sub = gmqtt.Subscription(self._ota_topic, qos=1)
            client.subscribe([self._desired_sub, self._ota_sub])  # one SUBSCRIBE
        else:  # the same Subscriptions: gmqtt's list would grow with each subscribe()
            client.resubscribe(self._desired_sub)
            client.resubscribe(self._ota_sub)
        self.queue_reported(self.twin.reported)
        self._flush_soon()

    def _on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        """gmqtt's on_message: a desired delta or an OTA command. Returns the reason code (0:
        success), which gmqtt ignores here (optimistic acknowledgement: the PUBACK went out
        before this)."""
        if topic == self._desired_topic:
            self.stats.desired_received += 1
            self.on_desired(payload)
        elif topic == self._ota_topic:
            self.on_ota_command(payload)
        else:
            log.debug("%s: message on unexpected topic %r ignored", self.device_id, topic)
        return 0

    def on_desired(self, payload: bytes) -> None:
        """Apply a desired message and report what was applied; repeats and malformed
        messages are logged (debug) and dropped."""
        try:
            update = parse_desired(payload)
        except ValueError as exc:
            log.debug("%s: malformed desired message ignored: %s", self.device_id, exc)
            return
        twin = apply_desired(self.twin, update)
        if twin is None:
            log.debug(
                "%s: desired version %d ignored (applied %d)",
                self.device_id,
                update.version,
                self.twin.version,
            )
            return
        self.twin = twin
        if update.state:
            self.queue_reported(update.state)
            self._flush_soon()
        self.persist()

    # ------------------------------------------------------------------ ota

    def on_ota_command(self, payload: bytes) -> None:
        """Take up an OTA command: it runs as a task, after any command before it. Repeats
        (handled, or under way) and malformed commands are logged (debug) and dropped."""
        try:
            command = parse_ota_command(payload)
        except ValueError as exc:
            log.debug("%s: malformed OTA command ignored: %s", self.device_id, exc)
            return
        ident = command.command_id
        if ident in self.ota.handled or ident in self._ota_under_way:
            log.debug("%s: OTA command %s already handled, ignored", self.device_id, ident)
            return
        self.stats.ota_commands += 1
        self._ota_under_way.add(ident)
        task = asyncio.get_running_loop().create_task(self._run_ota(command))
        self._ota_tasks.add(task)
        task.add_done_callback(self._ota_done)

    def _ota_done(self, task: asyncio.Task[None]) -> None:
        self._ota_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: OTA command failed: %r", self.device_id, task.exception())

    async def ota_settled(self) -> None:
        """Wait until every command taken up is handled."""
        while self._ota_tasks:
            await asyncio.gather(*self._ota_tasks, return_exceptions=True)

    async def _run_ota(self, command: OtaCommand) -> None:
        try:
            async with self._ota_lock:
                if isinstance(command, InstallCommand):
                    await self._install(command)
                else:
                    await self._rollback(command)
        finally:
            self._ota_under_way.discard(command.command_id)

    async def _ota_step(self) -> None:
        """A pause between two steps of an update (at least one loop turn)."""
        await asyncio.sleep(self.ota_step_s)

    def _report_ota(
        self, command: OtaCommand, status: str, version: str | None, reason: str | None = None
    ) -> None:
        """A status report into the outbox; its seq is saved at once (never reused)."""
        body = status_body(command, status, version, reason)
        self.outbox.append(self._message(OTA_STATUS, body))
        try:
            save_seq(self.creds, self.seq)
        except OSError as exc:
            log.warning("%s: could not save sequence numbers: %s", self.device_id, exc)
        self._flush_soon()

    def _commit_ota(self, state: OtaState) -> None:
        """Make `state` the device's (saved atomically; kept in memory if saving fails)."""
        self.ota = state
        try:
            save_ota(self.creds, state)
        except OSError as exc:
            log.warning("%s: could not save OTA state: %s", self.device_id, exc)

    def _finish(
        self,
        command: OtaCommand,
        status: str,
        reason: str | None = None,
        slots: ImageSlots | None = None,
    ) -> None:
        """End a command: commit the new slots (if any) with its id as handled, then report
        the version running and, when it changed, the twin's version keys."""
        kind = command.kind
        before = self.ota.version(kind)
        state = self.ota if slots is None else self.ota.with_slots(kind, slots)
        self._commit_ota(state.with_handled(command.command_id))
        version = self.ota.version(kind)
        if version != before:
            patch = {REPORTED_VERSION_KEYS[kind]: version}
            self.twin = LocalTwin(merge_reported(self.twin.reported, patch), self.twin.version)
            self.queue_reported(patch)
            self.persist()
        self._report_ota(command, status, version, reason)
        if status == SUCCEEDED:
            self.stats.ota_succeeded += 1
        elif reason is not None and reason in REFUSALS:
            self.stats.ota_refused += 1
        else:
            self.stats.ota_failed += 1

    async def _download(self, record: Mapping[str, Any]) -> bytes | str:
        """The artifact's bytes from the store, or the reason they could not be read."""
        if self.artifact_root is None:
            return NO_ARTIFACT_STORE
        path = artifact_file(self.artifact_root, record)
        if path is None:
            return DOWNLOAD_FAILED
        try:
            return await asyncio.to_thread(read_image, path)
        except OSError as exc:
            log.debug("%s: download of %s failed: %s", self.device_id, path, exc)
            return DOWNLOAD_FAILED

    def _refusal(self, command: InstallCommand, data: bytes) -> str | None:
        """Why the downloaded `data` must not be installed, or None."""
        if self.release_public_key is None:
            return NO_RELEASE_KEY
        reason = verify_download(data, command.artifact, self.release_public_key)
        if reason is not None:
            return reason
        if command.artifact.get("version") != command.version:
            return VERSION_MISMATCH
        if command.artifact.get("kind") != command.kind:
            return KIND_MISMATCH
        return None

    async def _install(self, command: InstallCommand) -> None:
        kind, version = command.kind, command.version
        slots = self.ota.slots_of(kind)
        if slots.version == version:  # already running it: nothing to install
            self._finish(command, SUCCEEDED)
            return
        self._report_ota(command, DOWNLOADING, version)
        await self._ota_step()
        data = await self._download(command.artifact)
        if isinstance(data, str):
            self._finish(command, FAILED, data)
            return
        self._report_ota(command, VERIFYING, version)
        await self._ota_step()
        refusal = self._refusal(command, data)
        if refusal is not None:
            self._finish(command, FAILED, refusal)
            return
        self._report_ota(command, INSTALLING, version)
        slot = slots.inactive
        # The other slot's old image is about to be overwritten: no longer a rollback target.
        invalidated = slots.with_slot(slot, None)
        self._commit_ota(self.ota.with_slots(kind, invalidated))
        image = image_path(self.creds, kind, slot)
        try:
            await asyncio.to_thread(write_atomically, image, data)
        except OSError as exc:
            log.warning("%s: could not write slot %s: %s", self.device_id, slot, exc)
            self._finish(command, FAILED, INSTALL_ERROR, invalidated)
            return
        await self._ota_step()
        if self.ota_faulty:  # an injected failure: the written image does not boot
            with contextlib.suppress(OSError):
                image.unlink(missing_ok=True)
            self._finish(command, FAILED, INSTALL_ERROR, invalidated)
            return
        # The switch: written at once with the image complete (a kill before this keeps the
        # old version running).
        self._finish(command, SUCCEEDED, slots=invalidated.with_slot(slot, version).switched())

    async def _rollback(self, command: RollbackCommand) -> None:
        slots = self.ota.slots_of(command.kind)
        if command.from_version is not None and slots.version != command.from_version:
            # Never switched to it (refused, failed, or interrupted): the previous version
            # still runs.
            self._finish(command, SUCCEEDED)
            return
        if slots.kept is None:
            self._finish(command, FAILED, NO_KEPT_IMAGE)
            return
        await self._ota_step()
        self._finish(command, SUCCEEDED, slots=slots.switched())

    def persist(self) -> None:
        """Save the twin and the sequence numbers (the report's seq must not be reused)."""
        try:
            save_twin(self.creds, self.twin)
            save_seq(self.creds, self.seq)
        except OSError as exc:
            log.warning("%s: could not save twin state: %s", self.device_id, exc)

    def flush_outbox(self) -> None:
        """Hand queued messages to the client in FIFO order while connected."""
        while self.outbox and self.client.is_connected:
            topic, payload = self.outbox.popleft()
            self.client.publish(topic, payload, qos=1)

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (outbox plus gmqtt's in-flight store)."""
        storage = self.client._persistent_storage
        return len(self.outbox) + (0 if storage.is_empty else len(storage.get_all()))

    async def run(
        self,
        rate: float,
        until: float,
        max_messages: int | None,
        stop: threading.Event | None = None,
    ) -> None:
        interval = 1.0 / rate
        await asyncio.sleep(self.rng.uniform(0, interval))  # spread devices over the period
        next_at = time.monotonic()
        while (
            time.monotonic() < until
            and (max_messages is None or self.seq[TELEMETRY] < max_messages)
            and not (stop is not None and stop.is_set())
        ):
            self.queue_telemetry()
            self.flush_outbox()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def drain(self, timeout: float) -> bool:
        """Wait for the updates under way to end and every message to be acknowledged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flush_outbox()
            if self.pending() == 0 and not self._ota_tasks:
                return True
            await asyncio.sleep(0.05)
        return self.pending() == 0

    async def close(self) -> None:
        """Disconnect; an update still under way is cut off (like power loss: not switched)."""
        for task in list(self._ota_tasks):
            task.cancel()
        await self.ota_settled()
        if self.client.is_connected:
            await self.client.disconnect()


def _seq_path(creds: DeviceCredentials) -> Path:
    return creds.cert_path.with_suffix(".seq.json")


def load_seq(creds: DeviceCredentials) -> dict[str, int]:
    try:
        data = json.loads(_seq_path(creds).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_seq(creds: DeviceCredentials, seq: dict[str, int]) -> None:
    _seq_path(creds).write_text(json.dumps(seq))
