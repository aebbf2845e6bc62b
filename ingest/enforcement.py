"""The broker enforces the device registry (`python -m infra.entrypoints.enforcer`).

The registry (`registry.devices`, compacted, key = device id, Avro `Device`) says which devices
may connect; this process makes Mosquitto agree, within seconds of a change:

- **revoked** -> the certificate's serial is revoked for good in the fleet CRL;
- **suspended** -> the serial is put *on hold* (CRL reason `certificateHold`, RFC 5280's
  temporary revocation), which the broker refuses exactly like a revocation;
- **active / provisioned** -> a hold is lifted (a full CRL just stops listing the serial). A
  permanently revoked serial is never released: such a device needs a new certificate.

After a CRL change the broker is sent SIGHUP (to the pid its service recorded, as
`fleet up` does), which makes it read the CRL again: new TLS handshakes of a listed
certificate fail, and TLS session resumption does not get around it (Mosquitto 2.0.11 builds
new TLS contexts on reload; checked: a ticket issued before the reload is not resumed after it).

**Ending sessions that are already open.** A reload leaves open connections alone (Mosquitto
2.0.11 keeps a revoked device's session and lets it publish). Three ways to end one were
weighed, each tried against the installed broker:

- *Session takeover* (a platform identity connects with the device's client id, the broker
  closes the old connection, then leaves with session expiry 0). Impossible: the broker makes
  every client id its certificate identity (`use_username_as_clientid`, so that no device can
  take another's connection over), which forbids the takeover itself.
- *The dynamic-security plugin* shipped with Mosquitto 2 (chosen). Its `deleteClient` command
  calls `mosquitto_kick_client_by_username`, which disconnects **every** connection whose
  username is the device id, whatever its client id; with `use_identity_as_username` the
  username is the certificate CN, so the kick follows the certificate identity. We send
  `createClient` + `deleteClient` for the device in one control message, so the plugin ends as
  empty as it started (reason code 0x98 "administrative action" for the device).
- A purpose-built C plugin: the same kick, but one more artefact to build and ship.

Why the plugin opens no hole (all checked against 2.0.11, see infra/services/mosquitto.py):
with `use_identity_as_username` the broker skips password/plugin authentication entirely, so
the plugin never admits anyone; its configuration is rewritten empty (no clients, roles,
groups; default access false) on every broker start; the ACL file is asked first and the plugin
defers every check for a username it does not know, so ACL decisions stay exactly the ACL
file's (a device still gets `Not authorized` outside `devices/<id>/#` and on `$CONTROL/#`).
Only the dedicated `enforcer` identity may publish to `$CONTROL/dynamic-security/v1` (`#`
never matches a `$` topic, so neither the orchestrator nor devices can); whoever holds that
power could grant devices topics through plugin roles, but the enforcer process also holds
the CA key, which is strictly more power (it can mint any identity), so no new principal
gains anything.

With the client id bound to the identity, two connections of one identity take each other
over; an enforcer therefore claims the first free of the reserved enforcer identities
(:func:`~ingest.mqtt_client.claim_identity`, a lock held while it runs), so a second one
(a test's, beside the service) gets its own.

Order matters: CRL written (atomically) -> SIGHUP -> kick. A kicked device that reconnects at
once meets the reloaded CRL; if the reload fails, nothing is kicked and both are retried.

The decision is pure (:func:`plan`, unit-tested): given the registry's records, the CRL's
state and which sessions were already ended, what to revoke, hold, release and whom to kick.
:class:`Enforcer` follows the topic with a :class:`~streams.runtime.tables.GlobalTable`, applies the
plan and reports in `<run dir>/enforcer.json`. It is a singleton next to the broker: it writes
the CA's CRL (serialized by a file lock) and signals the broker's process.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import psutil
from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.core import Metric

from ingest.enforcer_metrics import enforcer_metrics
from ingest.mqtt_client import (
    DYNSEC_RESPONSE_TOPIC,
    DYNSEC_TOPIC,
    IdentityFiles,
    claim_identity,
    client_tls_context,
)
from schemas.codec import AvroCodec, CodecRegistry, Decoded, load_schema
from schemas.identity import (
    DEVICE_ID_PATTERN,
    ENFORCER,
    ENFORCER_IDENTITIES,
    RESERVED_IDENTITIES,
    RevocationState,
)
from schemas.topics import schema_of
from streams.registry.devices import DeviceRecord, DeviceStatus
from streams.runtime.metrics import counted
from streams.runtime.status import write_status
from streams.runtime.tables import FOLLOW_WAIT_S, GlobalTable, key_text

__all__ = [
    "DEVICES",
    "EnforcementError",
    "Enforcer",
    "EnforcerConfig",
    "EnforcerCounters",
    "Plan",
    "RevocationAuthority",
    "SessionEnder",
    "Verdict",
    "denied_devices",
    "kick_commands",
    "kicked",
    "parse_serial",
    "plan",
    "verdict",
]

log = logging.getLogger("fleetstream.enforcement")

DEVICES = "registry.devices"
# revoked.json's free-text reason for what the registry revoked. Not an RFC 5280 reason name,
# so the CRL entry carries no reason code (unspecified): the registry does not say why.
REVOKE_REASON = "registry: device revoked"
_MAX_SERIAL = 2**160  # RFC 5280: a positive serial of at most 20 octets
RETRY_S = 1.0  # after a failed reload or kick
CRL_CHECK_S = 60.0  # how often the CRL's nextUpdate is looked at
KICK_BATCH = 100  # devices per control message (two commands each)


class EnforcementError(RuntimeError):
    """The broker could not be made to agree (not reachable, not authorized, no answer)."""


@dataclass(frozen=True)
class EnforcerConfig:
    """What the enforcer needs (infra/entrypoints/enforcer.py builds it from the settings)."""

    host: str  # the broker's
    mqtt_port: int
    registry_url: str
    run_dir: Path  # where the status file goes
    identities: IdentityFiles  # the enforcer identities' certificates and keys
    crl_validity_days: int  # the CA's: the CRL is re-signed halfway through


class RevocationAuthority(Protocol):
    """The fleet CA's revocation side (infra/pki.py's CertificateAuthority)."""

    def revocation_states(self) -> dict[int, RevocationState]: ...

    def update_revocations(
        self,
        *,
        revoke: Iterable[int] = (),
        hold: Iterable[int] = (),
        release: Iterable[int] = (),
        reason: str | None = None,
    ) -> bool: ...

    def refresh_crl(self) -> None: ...

    def crl(self) -> x509.CertificateRevocationList: ...


# A table of one compacted topic (streams/runtime/tables.py's GlobalTable), opened on a topic
# with the function each record is applied with.
OpenTable = Callable[[str, Callable[[Message], None]], GlobalTable]


# --------------------------------------------------------------------------- the pure part


class Verdict(IntEnum):
    """What a registry status asks of the broker; higher wins when a serial is shared."""

    allow = 0
    hold = 1
    revoke = 2


_VERDICTS = {
    DeviceStatus.provisioned: Verdict.allow,
    DeviceStatus.active: Verdict.allow,
    DeviceStatus.suspended: Verdict.hold,
    DeviceStatus.revoked: Verdict.revoke,
}


def verdict(status: DeviceStatus) -> Verdict:
    return _VERDICTS[DeviceStatus(status)]


def parse_serial(text: str) -> int | None:
    """The certificate serial of a registry record (decimal), or None if it is not one."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or text[0] == "0":
        return None
    serial = int(text)
    return serial if serial < _MAX_SERIAL else None


def _identity_problem(device_id: str, record: DeviceRecord) -> str | None:
    if record.device_id != device_id:
        return f"record names {record.device_id!r} under key {device_id!r}"
    if DEVICE_ID_PATTERN.fullmatch(device_id) is None:
        return "not a valid device id"
    if device_id.lower() in RESERVED_IDENTITIES:
        return "a platform identity, not a device"
    return None


def denied_devices(devices: Mapping[str, DeviceRecord]) -> frozenset[str]:
    """Device ids whose registry status refuses them at the broker (suspended or revoked)."""
    return frozenset(
        device_id
        for device_id, record in devices.items()
        if _identity_problem(device_id, record) is None and verdict(record.status) > Verdict.allow
    )


@dataclass(frozen=True)
class Plan:
    """What to change so that the broker agrees with the registry."""

    revoke: frozenset[int] = frozenset()  # list for good (or upgrade a hold)
    hold: frozenset[int] = frozenset()  # list as certificateHold
    release: frozenset[int] = frozenset()  # stop listing (holds only)
    end_sessions: tuple[str, ...] = ()  # device ids whose open sessions must end
    invalid: tuple[tuple[str, str], ...] = ()  # (device id, why it was skipped or half-done)
    stuck: tuple[str, ...] = ()  # allowed by the registry, but their serial is revoked for good

    @property
    def crl_changes(self) -> bool:
        return bool(self.revoke or self.hold or self.release)

    @property
    def empty(self) -> bool:
        return not (self.crl_changes or self.end_sessions)


def plan(
    devices: Mapping[str, DeviceRecord],
    crl: Mapping[int, RevocationState],
    ended: Set[str] = frozenset(),
) -> Plan:
    """What to revoke, hold, release and whose sessions to end.

    ``devices``: the registry (device id -> record); ``crl``: every serial the CRL lists and
    how; ``ended``: devices whose sessions were already ended while they stayed refused.

    A serial shared by several records takes the strictest verdict. Only holds are ever
    released; serials the registry does not name are left as they are (revoked by hand, or a
    device's earlier certificate). A refused device's sessions are ended even when its serial
    is unusable (the kick goes by identity), but such a device is reported in ``invalid``:
    nothing keeps it from reconnecting.
    """
    wanted: dict[int, Verdict] = {}
    owners: dict[int, list[str]] = {}
    invalid: list[tuple[str, str]] = []
    to_end: list[str] = []
    for device_id in sorted(devices):
        record = devices[device_id]
        problem = _identity_problem(device_id, record)
        if problem is not None:
            invalid.append((device_id, problem))
            continue
        decision = verdict(record.status)
        if decision > Verdict.allow and device_id not in ended:
            to_end.append(device_id)
        serial = parse_serial(record.cert_serial)
        if serial is None:
            invalid.append((device_id, f"certificate serial {record.cert_serial!r} is not one"))
            continue
        wanted[serial] = max(wanted.get(serial, Verdict.allow), decision)
        owners.setdefault(serial, []).append(device_id)

    revoke, hold, release, stuck = set(), set(), set(), []
    for serial, decision in wanted.items():
        listed = crl.get(serial)
        if decision is Verdict.revoke and listed is not RevocationState.revoked:
            revoke.add(serial)
        elif decision is Verdict.hold and listed is None:
            hold.add(serial)
        elif decision is Verdict.allow:
            if listed is RevocationState.on_hold:
                release.add(serial)
            elif listed is RevocationState.revoked:
                stuck += owners[serial]
    return Plan(
        revoke=frozenset(revoke),
        hold=frozenset(hold),
        release=frozenset(release),
        end_sessions=tuple(to_end),
        invalid=tuple(invalid),
        stuck=tuple(sorted(stuck)),
    )


def kick_commands(device_ids: Sequence[str], batch: str) -> list[dict[str, str]]:
    """The dynamic-security commands that end every session of ``device_ids``.

    createClient then deleteClient: the delete kicks the username's connections and leaves the
    plugin as empty as before (a create that finds the client already there is harmless).
    """
    commands = []
    for index, device_id in enumerate(device_ids):
        for verb in ("createClient", "deleteClient"):
            commands.append(
                {"command": verb, "username": device_id, "correlationData": f"{batch}:{index}"}
            )
    return commands


def kicked(
    device_ids: Sequence[str], batch: str, responses: Iterable[Mapping[str, Any]]
) -> dict[str, str | None]:
    """Per device of a batch: None if its deleteClient succeeded, else the error (or why not)."""
    outcome: dict[str, str | None] = dict.fromkeys(device_ids, "no answer")
    for response in responses:
        correlation = str(response.get("correlationData", ""))
        prefix, _, index = correlation.rpartition(":")
        if prefix != batch or response.get("command") != "deleteClient" or not index.isdigit():
            continue
        position = int(index)
        if position < len(device_ids):
            error = response.get("error")
            outcome[device_ids[position]] = None if error is None else str(error)
    return outcome


# --------------------------------------------------------------------------- ending sessions


class SessionEnder:
    """An MQTT 5 client with an enforcer identity, talking to the dynamic-security plugin.

    It holds the first free enforcer identity until :meth:`close`; the broker makes that
    identity its client id.
    """

    def __init__(self, config: EnforcerConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        files = config.identities
        claim = claim_identity(files, ENFORCER_IDENTITIES)
        if claim is None:
            raise EnforcementError(
                f"all {len(ENFORCER_IDENTITIES)} enforcer identities are held by running "
                "enforcers; stop one"
            )
        self._claim = claim
        self.client_id = claim.name
        try:
            context = client_tls_context(
                files.ca_cert, files.identity_cert(claim.name), files.identity_key(claim.name)
            )
        except BaseException:
            claim.release()
            raise
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        self._client.tls_set_context(context)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._cond = threading.Condition()
        self._ready = False  # connected and subscribed to the responses
        self._problem: str | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._pending: set[str] = set()  # batches awaiting the plugin's answer
        self._responses: list[dict[str, Any]] = []  # answers to those batches

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            with self._cond:
                self._problem = f"broker refused the enforcer: {reason}"
            return
        client.subscribe(DYNSEC_RESPONSE_TOPIC, qos=1)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        with self._cond:
            if codes and not codes[0].is_failure:
                self._ready, self._problem = True, None
            else:
                self._problem = (
                    f"may not read {DYNSEC_RESPONSE_TOPIC} ({codes[0] if codes else '?'}): the "
                    "broker runs an older ACL; restart it (fleet down/up) to load the current one"
                )
            self._cond.notify_all()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._cond:
            self._ready = False
            self._problem = f"disconnected from the broker: {reason}"
            self._cond.notify_all()

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
            responses = body.get("responses", []) if isinstance(body, dict) else []
        except ValueError:
            return
        with self._cond:
            # Only answers to our batches: another enforcer's are not ours to keep.
            self._responses.extend(
                r
                for r in responses
                if isinstance(r, dict)
                and str(r.get("correlationData", "")).partition(":")[0] in self._pending
            )
            self._cond.notify_all()

    # ---------------------------------------------------------------- API

    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after a broker restart."""
        self._client.connect_async(self.config.host, self.config.mqtt_port, keepalive=30)
        self._client.loop_start()

    @property
    def ready(self) -> bool:
        with self._cond:
            return self._ready

    @property
    def problem(self) -> str | None:
        with self._cond:
            return self._problem

    def wait_ready(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._ready, timeout)

    def end(self, device_ids: Sequence[str]) -> dict[str, str | None]:
        """End every session of each device; per device None if done, else why not."""
        outcome: dict[str, str | None] = {}
        ids = list(device_ids)
        for start in range(0, len(ids), KICK_BATCH):
            outcome.update(self._end_batch(ids[start : start + KICK_BATCH]))
        return outcome

    def _end_batch(self, device_ids: list[str]) -> dict[str, str | None]:
        if not self.wait_ready(self.timeout):
            raise EnforcementError(self.problem or "not connected to the broker")
        batch = uuid.uuid4().hex
        payload = json.dumps({"commands": kick_commands(device_ids, batch)})
        with self._cond:
            self._pending.add(batch)
        try:
            return self._send(device_ids, batch, payload)
        finally:
            with self._cond:
                self._pending.discard(batch)
                self._responses = [
                    r
                    for r in self._responses
                    if str(r.get("correlationData", "")).partition(":")[0] != batch
                ]

    def _send(self, device_ids: list[str], batch: str, payload: str) -> dict[str, str | None]:
        info = self._client.publish(DYNSEC_TOPIC, payload, qos=1)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            if not self._cond.wait_for(lambda: info.mid in self._acks, self.timeout):
                raise EnforcementError(f"no PUBACK from the broker within {self.timeout}s")
            ack = self._acks.pop(info.mid)
            if ack.is_failure:
                raise EnforcementError(
                    f"broker refused the control message ({ack}): is the dynamic-security "
                    "plugin loaded and the ACL current? restart mosquitto (fleet down/up)"
                )

            def answered() -> bool:
                return any(
                    str(r.get("correlationData", "")).startswith(f"{batch}:")
                    and r.get("command") == "deleteClient"
                    for r in self._responses
                )

            if not self._cond.wait_for(answered, max(0.0, deadline - time.monotonic())):
                raise EnforcementError(f"no answer from the dynamic-security plugin in {batch}")
            mine = [
                r
                for r in self._responses
                if str(r.get("correlationData", "")).startswith(f"{batch}:")
            ]
        return kicked(device_ids, batch, mine)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._claim.release()  # after the loop: no reconnect under a released identity


# --------------------------------------------------------------------------- the runner


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class EnforcerCounters:
    records: int = counted("Registry records applied")
    # A record that is not a Device keeps the previous state.
    undecodable: int = counted("Registry records that are not a Device")
    revoked: int = counted("Certificate serials revoked")
    held: int = counted("Certificate serials put on hold")
    released: int = counted("Holds lifted")
    reloads: int = counted("Broker reloads (SIGHUP)")
    sessions_ended: int = counted("Device sessions ended")
    errors: int = counted("Failed reconciliations (retried)")
    crl_refreshes: int = counted("CRL refreshes")
    # From the registry record's Kafka timestamp to the broker's confirmation of the kick.
    last_end_latency_ms: int | None = None
    max_end_latency_ms: int | None = None


@dataclass
class _State:
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    written_ms: dict[str, int] = field(default_factory=dict)  # Kafka timestamp per device
    ended: frozenset[str] = frozenset()
    invalid: tuple[tuple[str, str], ...] = ()
    stuck: tuple[str, ...] = ()


class Enforcer:
    """Follows `registry.devices` and makes the broker's CRL and sessions agree with it.

    ``ca`` is the fleet CA (its CRL), ``reload_broker`` makes the broker read the CRL again
    (raising :class:`EnforcementError` when it cannot), ``open_table`` opens the registry's
    table: the composition root (infra/entrypoints/enforcer.py) passes them in.
    """

    def __init__(
        self,
        config: EnforcerConfig,
        ca: RevocationAuthority,
        reload_broker: Callable[[], None],
        open_table: OpenTable,
    ) -> None:
        self.config = config
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.reload_broker = reload_broker
        registry = CodecRegistry(SchemaRegistryClient({"url": config.registry_url}))
        self.codec: AvroCodec = registry.codec(DEVICES, load_schema(schema_of(DEVICES)))
        self.counters = EnforcerCounters()
        self.state = _State()
        self.table = open_table(DEVICES, self._apply)
        self.sessions = SessionEnder(config)
        self.ready = False  # caught up, and the broker agrees with what was read
        self.last_error: str | None = None
        self._dirty = True
        self._reload_pending = False
        self._retry_at = 0.0
        self._crl_checked_at = 0.0

    # ------------------------------------------------------------------ the table

    def _apply(self, msg: Message) -> None:
        device_id, value = key_text(msg), msg.value()
        self.counters.records += 1
        if value is None:  # a tombstone: forget the device; its CRL entries stay as they are
            self.state.devices.pop(device_id, None)
            self._dirty = True
            return
        decoded = self.codec.decode(value)
        try:
            if not isinstance(decoded, Decoded):
                raise ValueError(decoded.detail)
            record = DeviceRecord.from_record(decoded.record)
        except (ValueError, KeyError, TypeError) as exc:
            self.counters.undecodable += 1
            log.warning("registry record %s at offset %s ignored: %s", device_id, msg.offset(), exc)
            return
        self.state.devices[device_id] = record
        _kind, timestamp = msg.timestamp()
        self.state.written_ms[device_id] = timestamp if timestamp > 0 else now_ms()
        self._dirty = True

    # ------------------------------------------------------------------ reconciling

    def reconcile(self) -> bool:
        """Make the CRL and the broker agree with the registry; True if fully done."""
        state = self.state
        result = plan(state.devices, self.ca.revocation_states(), state.ended)
        if result.invalid != state.invalid:
            for device_id, why in result.invalid:
                log.warning("device %s: %s", device_id, why)
        if result.stuck != state.stuck:
            for device_id in result.stuck:
                log.warning(
                    "device %s is allowed but its certificate is revoked for good: it needs a "
                    "new certificate",
                    device_id,
                )
        state.invalid, state.stuck = result.invalid, result.stuck
        if result.crl_changes:
            self.ca.update_revocations(
                revoke=result.revoke,
                hold=result.hold,
                release=result.release,
                reason=REVOKE_REASON,
            )
            self.counters.revoked += len(result.revoke)
            self.counters.held += len(result.hold)
            self.counters.released += len(result.release)
            self._reload_pending = True
            log.info(
                "CRL: revoked %s, on hold %s, released %s",
                sorted(result.revoke),
                sorted(result.hold),
                sorted(result.release),
            )
        if self._reload_pending:
            self.reload_broker()  # EnforcementError if it is not running: retried
            self._reload_pending = False
            self.counters.reloads += 1
        done = True
        if result.end_sessions:
            outcome = self.sessions.end(result.end_sessions)
            ended = {device_id for device_id, error in outcome.items() if error is None}
            for device_id, error in outcome.items():
                if error is not None:
                    log.warning("could not end the sessions of %s: %s", device_id, error)
            if self.ready:  # a live change, not the backlog read at start
                self._note_latency(ended)
            self.counters.sessions_ended += len(ended)
            state.ended = state.ended | ended
            done = len(ended) == len(result.end_sessions)
            log.info("sessions ended: %s", sorted(ended))
        # A device allowed again may be refused (and kicked) again later.
        state.ended = state.ended & denied_devices(state.devices)
        return done

    def _note_latency(self, ended: Iterable[str]) -> None:
        now = now_ms()
        for device_id in ended:
            written = self.state.written_ms.get(device_id)
            if written is None:
                continue
            latency = max(0, now - written)
            self.counters.last_end_latency_ms = latency
            self.counters.max_end_latency_ms = max(self.counters.max_end_latency_ms or 0, latency)

    def _refresh_crl_if_due(self) -> None:
        """Re-sign the CRL halfway through its validity: brokers refuse every client after."""
        next_update = self.ca.crl().next_update_utc
        half = dt.timedelta(days=self.config.crl_validity_days / 2)
        if next_update is None or next_update - dt.datetime.now(dt.UTC) < half:
            self.ca.refresh_crl()
            self.counters.crl_refreshes += 1
            self._reload_pending = True
            self._dirty = True

    def step(self, wait: float = 0.0) -> int:
        """Apply what arrived (waiting up to `wait` s for a first record) and reconcile if
        needed; returns the records applied."""
        applied = self.table.poll(wait)
        now = time.monotonic()
        if now - self._crl_checked_at >= CRL_CHECK_S:
            self._crl_checked_at = now
            self._refresh_crl_if_due()
        if (self._dirty or self._retry_at) and now >= self._retry_at:
            self._dirty = False
            try:
                done = self.reconcile()
            except (EnforcementError, OSError, psutil.Error) as exc:
                done = False
                self.counters.errors += 1
                self.last_error = str(exc)
                log.warning("enforcement incomplete, retrying in %.0fs: %s", RETRY_S, exc)
            if done:
                self._retry_at = 0.0
                self.last_error = None
                self.ready = True
            else:
                self._retry_at = now + RETRY_S
        return applied

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self.sessions.start()
        self.table.catch_up()
        self.sessions.wait_ready(self.sessions.timeout)

    def run(self, stopping: threading.Event) -> None:
        self.start()
        reported_at = 0.0
        try:
            while not stopping.is_set():
                self.step(FOLLOW_WAIT_S)  # a record ends the wait at once
                if time.monotonic() - reported_at > 1.0:
                    self.write_status()
                    reported_at = time.monotonic()
        finally:
            self.close()

    # ------------------------------------------------------------------ status

    @property
    def status_path(self) -> Path:
        return self.config.run_dir / f"{ENFORCER}.json"

    def metrics(self) -> Iterator[Metric]:
        return enforcer_metrics(self.counters)

    def write_status(self) -> None:
        crl = self.ca.revocation_states()
        write_status(
            self.status_path,
            {
                "pid": os.getpid(),
                "ready": self.ready,
                "connected": self.sessions.ready,
                "devices": len(self.state.devices),
                "denied": len(denied_devices(self.state.devices)),
                "crl_revoked": sum(s is RevocationState.revoked for s in crl.values()),
                "crl_on_hold": sum(s is RevocationState.on_hold for s in crl.values()),
                "invalid": [list(item) for item in itertools.islice(self.state.invalid, 20)],
                "stuck": list(self.state.stuck[:20]),
                "last_error": self.last_error,
                **asdict(self.counters),
            },
        )

    def close(self) -> None:
        self.ready = False
        self.write_status()
        self.sessions.close()
        self.table.close()
