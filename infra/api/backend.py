"""The API's backend: what it reads and writes (:class:`Backend`), and the platform's
implementation on Kafka (:class:`KafkaBackend`): the compacted topics followed in memory, the
registry and twin agents, the OTA controller and the CA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaException, Message, Producer
from cryptography import x509

from infra.api.client import (
    AUDIT,
    COMMANDS,
    DESIRED,
    DEVICES,
    GRANTS,
    OTA_REQUESTS,
    RESPONSES,
    ROLLOUTS,
    RULES,
    TWIN_STATE,
    HotPathClient,
    HotPathError,
    TwinAnswer,
)
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.process import kafka_config
from infra.services.base import ServiceError
from infra.settings import Settings
from schemas.codec import Decoded
from streams.hot.alerts import AlertRule, rule_from_record, rule_to_record
from streams.hot.twin import Twin, from_record
from streams.ota.events import OtaRequest
from streams.ota.model import Rollout
from streams.ota.model import from_record as rollout_from_record
from streams.registry.devices import AuditRecord, DeviceRecord, RegistryCommand
from streams.registry.rbac import GrantSet, Principal
from streams.runtime.tables import FOLLOW_WAIT_S, GlobalTables, key_text

__all__ = ["Backend", "KafkaBackend"]

log = logging.getLogger("fleetstream.api")


class Backend(Protocol):
    """What the API reads and writes; :class:`KafkaBackend` on the real platform.

    The tables are in memory and never block; the other methods block (Kafka, the CA) and are
    called in a worker thread.
    """

    @property
    def ca_pem(self) -> bytes: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def sizes(self) -> dict[str, int]: ...

    def grants(self) -> Mapping[str, GrantSet]: ...

    def device(self, device_id: str) -> DeviceRecord | None: ...

    def devices(self) -> list[DeviceRecord]: ...

    def twin(self, device_id: str) -> Twin | None: ...

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate`` holds (re-checked when a table changes) or ``timeout``."""
        ...

    def issue_certificate(self, csr_pem: bytes, device_id: str) -> x509.Certificate: ...

    def revoke_certificate(self, serial: int, reason: str) -> None: ...

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]: ...

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str
    ) -> TwinAnswer: ...

    def put_grants(self, grants: GrantSet, audit: AuditRecord) -> None:
        """Write the grant set and its audit record together (one transaction)."""
        ...

    def write_audit(self, record: AuditRecord) -> None: ...

    def rules(self) -> Mapping[str, AlertRule]: ...

    def put_rule(self, rule_id: str, rule: AlertRule | None, audit: AuditRecord) -> None:
        """Write a rule (None: delete it) and its audit record, both or neither."""

    def rollouts(self) -> Mapping[str, Rollout]: ...

    def ota_request(self, request: OtaRequest, principal: Principal) -> AuditRecord:
        """Ask the OTA controller; its decision (the audit record answering the request)."""


class KafkaBackend:
    """The platform's topics, followed in memory, and its clients (registry agent, twin agent,
    CA, a transactional producer for what the API itself writes)."""

    def __init__(self, settings: Settings, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.client = HotPathClient(settings, timeout)
        self.ca = CertificateAuthority.load_or_create(
            settings.pki_dir, passphrase=key_passphrase(settings)
        )
        self._lock = threading.Lock()
        self._ca_lock = threading.Lock()
        self._producer_lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._grants: dict[str, GrantSet] = {}
        self._twins: dict[str, Twin] = {}
        self._rules: dict[str, AlertRule] = {}
        self._rollouts: dict[str, Rollout] = {}
        followed: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any]]] = [
            (DEVICES, self._devices, DeviceRecord.from_record),
            (GRANTS, self._grants, GrantSet.from_record),
            (TWIN_STATE, self._twins, from_record),
            (RULES, self._rules, rule_from_record),
            (ROLLOUTS, self._rollouts, rollout_from_record),
        ]
        appliers = {topic: self._applier(topic, into, parse) for topic, into, parse in followed}
        self._tables = GlobalTables(
            kafka_config(settings, "api"), appliers, name="fleetstream-api-tables"
        )
        self._producer: Producer | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._ready = False

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    # ------------------------------------------------------------------ tables

    def _record(self, topic: str, msg: Message) -> dict[str, Any] | None:
        value = msg.value()
        if value is None:
            return None
        decoded = self.client.codec(topic).decode(value)
        if not isinstance(decoded, Decoded):
            log.warning("%s at offset %d unreadable: %s", topic, msg.offset(), decoded.detail)
            return None
        return decoded.record

    def _applier(
        self, topic: str, into: dict[str, Any], parse: Callable[[dict[str, Any]], Any]
    ) -> Callable[[Message], None]:
        """How a followed topic's record lands in ``into``: parsed, or a tombstone (a record
        that cannot be parsed is logged and counts as one)."""

        def apply(msg: Message) -> None:
            key, record = key_text(msg), self._record(topic, msg)
            try:
                value = None if record is None else parse(record)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s %s at offset %d ignored: %s", topic, key, msg.offset(), exc)
                value = None
            with self._lock:
                if value is None:
                    into.pop(key, None)
                else:
                    into[key] = value

        return apply

    def grants(self) -> Mapping[str, GrantSet]:
        with self._lock:
            return dict(self._grants)

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            return self._devices.get(device_id)

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            return list(self._devices.values())

    def twin(self, device_id: str) -> Twin | None:
        with self._lock:
            return self._twins.get(device_id)

    def rules(self) -> Mapping[str, AlertRule]:
        with self._lock:
            return dict(self._rules)

    def rollouts(self) -> Mapping[str, Rollout]:
        with self._lock:
            return dict(self._rollouts)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "devices": len(self._devices),
                "grant_sets": len(self._grants),
                "twins": len(self._twins),
                "rules": len(self._rules),
                "rollouts": len(self._rollouts),
            }

    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ following

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        await asyncio.to_thread(self._catch_up)
        self._thread = threading.Thread(target=self._follow, name="api-tables", daemon=True)
        self._thread.start()
        self._ready = True

    def _catch_up(self) -> None:
        topics = (COMMANDS, AUDIT, DESIRED, RESPONSES, GRANTS, DEVICES, TWIN_STATE, RULES)
        for topic in (*topics, ROLLOUTS, OTA_REQUESTS):
            self.client.codec(topic)  # registered once, before the first request needs it
        applied = self._tables.catch_up()
        log.info("%s read to their end: %d records", ", ".join(self._tables.topics), applied)
        with self._producer_lock:
            self._transactional()

    def _follow(self) -> None:
        while not self._stopping.is_set():
            try:
                applied = self._tables.poll(FOLLOW_WAIT_S)
            except Exception:
                log.exception("following the tables failed; retrying in a second")
                self._stopping.wait(1.0)
                continue
            if applied:
                self._notify_threadsafe()

    def _notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True

    async def stop(self) -> None:
        self._ready = False
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._tables.close()
        with self._producer_lock:
            if self._producer is not None:
                self._producer.flush(self.timeout)
        self.client.close()

    # ------------------------------------------------------------------ writes

    def _transactional(self) -> Producer:
        """The API's own producer (caller holds the producer lock)."""
        if self._producer is None:
            producer = Producer(
                {
                    "bootstrap.servers": self.settings.bootstrap_servers,
                    "transactional.id": f"fleetstream-api-{self.settings.api_port}",
                    "transaction.timeout.ms": 10_000,
                    "enable.idempotence": True,
                    "acks": "all",
                }
            )
            producer.init_transactions(self.timeout)  # fences a predecessor's open transaction
            self._producer = producer
        return self._producer

    def _transact(self, records: Sequence[tuple[str, str, bytes | None]]) -> None:
        """Write ``(topic, key, value)`` records in one transaction: all visible, or none."""
        with self._producer_lock:
            try:
                producer = self._transactional()
                producer.begin_transaction()
                for topic, key, value in records:
                    producer.produce(topic, key=key, value=value)
                producer.commit_transaction(self.timeout)
            except KafkaException as exc:
                error = exc.args[0]
                if self._producer is not None and error.txn_requires_abort():
                    with contextlib.suppress(KafkaException):
                        self._producer.abort_transaction(self.timeout)
                else:  # fatal or unknown: a fresh producer (same id) next time
                    self._producer = None
                raise HotPathError(f"not written: {error}") from exc

    def _audit_entry(self, record: AuditRecord) -> tuple[str, str, bytes]:
        value = self.client.codec(AUDIT).encode(record.to_record())
        return AUDIT, record.device_id or record.principal, value

    def write_audit(self, record: AuditRecord) -> None:
        self._transact([self._audit_entry(record)])

    def put_grants(self, grants: GrantSet, audit: AuditRecord) -> None:
        value = self.client.codec(GRANTS).encode(grants.to_record())
        self._transact([(GRANTS, grants.principal.key, value), self._audit_entry(audit)])

    def registry_commands(self, commands: Sequence[RegistryCommand]) -> dict[str, AuditRecord]:
        return self.client.registry_commands(commands)

    def put_rule(self, rule_id: str, rule: AlertRule | None, audit: AuditRecord) -> None:
        value = None if rule is None else self.client.codec(RULES).encode(rule_to_record(rule))
        self._transact([(RULES, rule_id, value), self._audit_entry(audit)])

    def ota_request(self, request: OtaRequest, principal: Principal) -> AuditRecord:
        return self.client.ota_request(request, principal)

    def set_desired(
        self, device_id: str, patch: Mapping[str, Any], version: int | None, principal: str
    ) -> TwinAnswer:
        return self.client.set_desired(device_id, patch, version, principal)

    # ------------------------------------------------------------------ the CA

    def issue_certificate(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        return self.ca.issue_from_csr(csr_pem, device_id)

    def revoke_certificate(self, serial: int, reason: str) -> None:
        """Revoke in the CA's CRL and have the broker read it again (if it runs)."""
        from infra.services.mosquitto import Mosquitto

        with self._ca_lock:
            self.ca.revoke(serial, reason)
        try:
            Mosquitto(self.settings).reload()
        except (ServiceError, OSError) as exc:
            log.warning("broker not reloaded after revoking %d: %s", serial, exc)
