"""The platform's Faust app for data engineers' jobs, and the platform's topics on it.

A job file does ``from streams.jobs import app, topics`` and declares agents with
``@app.agent(topics.telemetry)``. Faust's contract is one app object that job modules import
and decorate at import time, so :data:`app` is created here, unconfigured; the composition
root (``fleet jobs run``) calls :meth:`JobsApp.configure` with a :class:`JobsConfig` before it
imports the job file.

Guarantee: at least once. Offsets are committed after an agent has taken the next event, so
a crash repeats what was in flight; outputs must be keyed and idempotent. Faust's
exactly-once mode is not used (it duplicates output after a crash: faust-streaming #517,
#177, #323).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust
from confluent_kafka.schema_registry import SchemaRegistryClient
from faust.exceptions import DecodeError, NotReady
from faust.types import ProcessingGuarantee
from faust.web import Request, Response, View

from schemas.codec import CodecRegistry
from streams.jobs.codec import ConfluentAvroCodec, RegistrySchemas
from streams.jobs.config import JobsConfig, TopicDecl
from streams.jobs.records import record_type
from streams.jobs.registry import RegistryTable
from streams.jobs.transport import ReadCommittedTransport

_UNCONFIGURED = "fleet-job"
DLQ_RETENTION_MS = 30 * 24 * 3600 * 1000


def attribute_name(topic: str) -> str:
    """`telemetry.raw` -> `telemetry`, `device.events` -> `device_events`, ..."""
    return topic.removesuffix(".raw").replace(".", "_").replace("-", "_")


def faust_options(config: JobsConfig) -> dict[str, Any]:
    """Faust settings from the plain config."""
    return {
        "broker": ";".join(f"kafka://{b}" for b in config.brokers),
        "id_format": "{id}",  # the consumer group is the job's name, no "-v1" suffix
        "datadir": str(config.state_dir),
        "store": "rocksdb://" if _has_rocksdb() else "memory://",
        "topic_partitions": config.partitions,
        "topic_replication_factor": config.replication_factor,
        "processing_guarantee": ProcessingGuarantee.AT_LEAST_ONCE,
        # A new job reads its topics from the start: nothing published before it joined is
        # skipped. A job already running resumes from its committed offsets.
        "consumer_auto_offset_reset": "earliest",
        # A worker killed without leaving its group holds its partitions until the session
        # times out: 10 s, not Faust's 60, so a restarted job resumes soon.
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 3.0,
        "Topic": DeadLetteringTopic,
        "web_enabled": config.web_port is not None,
        "web_port": config.web_port or 6066,
        "web_host": "127.0.0.1",
        "web_bind": "127.0.0.1",
    }


def _has_rocksdb() -> bool:
    try:
        import rocksdict  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


class DeadLetteringTopic(faust.Topic):
    """faust.Topic; what it cannot decode goes to the job's dead-letter topic.

    Faust acks such a message and throws the error into the agent's stream, whose current
    event is then the one before: the agent cannot tell which message it was, the topic can.
    """

    async def on_decode_error(self, exc: Exception, message: Any) -> None:
        await super().on_decode_error(exc, message)
        if isinstance(self.app, JobsApp):
            await self.app.dead_letter_message(message, exc)


class JobsApp(faust.App):
    """faust.App with the platform's codecs and topics, and a dead-letter topic per job."""

    def __init__(self) -> None:
        super().__init__(_UNCONFIGURED, autodiscover=False)
        self.jobs_config: JobsConfig | None = None
        self._codecs: dict[str, ConfluentAvroCodec] = {}
        self._registry: tuple[CodecRegistry, RegistrySchemas] | None = None
        self._own_topics: list[faust.TopicT] = []
        self._dlq: faust.TopicT | None = None
        self._devices: RegistryTable | None = None

    # --- configuration ------------------------------------------------------------------------

    def configure(self, config: JobsConfig) -> None:
        """Point the app at the stack and name it after the job; before the job file's import."""
        self.jobs_config = config
        self.config_from_object(faust_options(config), force=True)
        self.conf.id = config.job
        self._codecs.clear()
        self._registry = None
        self._dlq = None
        self._devices = None

    def _config(self) -> JobsConfig:
        if self.jobs_config is None:
            raise RuntimeError("streams.jobs.app is not configured: run it with `fleet jobs run`")
        return self.jobs_config

    def avro_codec(self, topic: str, schema: str) -> ConfluentAvroCodec:
        """The Confluent wire-format codec of ``schema`` (an .avsc stem) on ``topic``; one each."""
        codec = self._codecs.get(topic)
        if codec is None:
            if self._registry is None:
                client = SchemaRegistryClient({"url": self._config().registry_url})
                self._registry = (CodecRegistry(client), RegistrySchemas(client))
            registry, writers = self._registry
            codec = self._codecs[topic] = ConfluentAvroCodec(topic, schema, registry, writers)
        return codec

    def _new_transport(self) -> Any:
        # Faust's own aiokafka transport, but its consumer reads committed records only.
        return ReadCommittedTransport(self.conf.broker_consumer, self)

    # --- topics --------------------------------------------------------------------------------

    def topic(self, *names: str, **kwargs: Any) -> faust.TopicT:
        """faust.App.topic; a topic the job declares is created on start, before any send."""
        made = super().topic(*names, **kwargs)
        if names and not any(n in self.catalogue() for n in names):
            self._own_topics.append(made)
        return made

    def avro_topic(
        self, name: str, schema: str, *, partitions: int | None = None, **kwargs: Any
    ) -> faust.TopicT:
        """A topic of Avro records of ``schemas/avro/<schema>.avsc``, keyed by a string."""
        return self.topic(
            name,
            key_type=str,
            key_serializer="raw",
            value_type=record_type(schema),
            value_serializer=self.avro_codec(name, schema),
            partitions=partitions,
            **kwargs,
        )

    def catalogue(self) -> dict[str, TopicDecl]:
        if self.jobs_config is None:
            return {}
        return {decl.name: decl for decl in self.jobs_config.topics}

    def platform_topic(self, name: str) -> faust.TopicT:
        """The catalogue's topic ``name`` (Avro values as records, keys as strings)."""
        decl = self.catalogue().get(name)
        if decl is None:
            raise KeyError(f"{name!r} is not a platform topic")
        if decl.schema is None:
            return super().topic(
                name, key_type=str, key_serializer="raw", partitions=decl.partitions
            )
        return super().topic(
            name,
            key_type=str,
            key_serializer="raw",
            value_type=record_type(decl.schema),
            value_serializer=self.avro_codec(name, decl.schema),
            partitions=decl.partitions,
        )

    @property
    def devices(self) -> RegistryTable:
        """The device registry, read-only: a GlobalTable of ``registry.devices`` (device id ->
        the ``Device`` entry as a dict; ``devices.group_of(device_id)`` -> ``org/project/group``).

        Made on first use, at the job's import: only jobs that use it read the registry.
        """
        if self._devices is not None:
            return self._devices
        source = "registry.devices"
        decl = self.catalogue().get(source)
        if decl is None or decl.schema is None:
            raise RuntimeError("the jobs app is not configured: run it with `fleet jobs run`")
        # Values as dicts (value_type None): a tombstone is a deletion, not a decode error.
        changelog = super().topic(
            source,
            key_type=str,
            key_serializer="raw",
            value_serializer=self.avro_codec(source, decl.schema),
            partitions=decl.partitions,
        )
        table = RegistryTable(
            self,
            name="registry_devices",
            key_type=str,
            value_type=None,
            changelog_topic=changelog,  # read through it: its codec decodes the entries
            partitions=decl.partitions,
            beacon=self.tables.beacon,
            # A global table: every worker of the job reads every partition, applying
            # changes as they come (as faust.App.GlobalTable sets it up).
            is_global=True,
            synchronize_all_active_partitions=True,
            standby_buffer_size=1,
            # Its partitions are "active" too, and Faust applies an active changelog's events
            # in batches of this size, also after recovery: 1, or a new device waits for 999
            # more (faust.GlobalTable's docstring asks for it with several workers too).
            recovery_buffer_size=1,
            help="the device registry (registry.devices), read-only",
        )
        self.tables.add(table)
        self._devices = table
        self.page("/devices/{device_id}/")(_registry_view(table))
        return table

    def dlq(self) -> faust.TopicT:
        """``dlq.jobs.<job>``: raw key and value of what an agent raised on, with the reason."""
        if self._dlq is None:
            self._dlq = self.topic(
                self._config().dlq_topic(),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                retention=DLQ_RETENTION_MS / 1000,
            )
        return self._dlq

    async def on_start(self) -> None:
        await super().on_start()
        if self.jobs_config is not None:
            self.dlq()
            # Brokers never auto-create topics: declare the job's own before any agent sends.
            for topic in self._own_topics:
                try:
                    await topic.maybe_declare()
                except NotReady:
                    if not self.should_stop:
                        raise
                    return  # a stop signal came mid-start and closed the producer: stop

    # --- agents --------------------------------------------------------------------------------

    def agent(self, channel: Any = None, **kwargs: Any) -> Callable[[Any], Any]:
        """faust.App.agent; an event the agent raises on goes to the job's dead-letter topic."""
        decorate = super().agent(channel, **kwargs)

        def wrap(fun: Callable[..., Any]) -> Any:
            return decorate(self._dead_lettering(fun))

        return wrap

    def _dead_lettering(self, fun: Callable[..., Any]) -> Callable[..., Any]:
        # Faust's default logs the error, marks the event done and restarts the agent: the
        # event would be lost. Here it is on the dead-letter topic first; then Faust restarts.
        if inspect.isasyncgenfunction(fun):

            @functools.wraps(fun)
            async def generator(stream: faust.StreamT[Any]) -> AsyncIterator[Any]:
                try:
                    async for item in fun(stream):
                        yield item
                except Exception as exc:
                    await self.dead_letter(stream, exc)
                    raise

            return generator

        @functools.wraps(fun)
        async def coroutine(stream: faust.StreamT[Any]) -> None:
            try:
                await fun(stream)
            except Exception as exc:
                await self.dead_letter(stream, exc)
                raise

        return coroutine

    async def dead_letter(self, stream: faust.StreamT[Any], exc: BaseException) -> None:
        """Send the stream's current event, as received, to the DLQ and wait for Kafka's ack."""
        if isinstance(exc, DecodeError):
            return  # parked by its topic (DeadLetteringTopic): the current event is another
        event = stream.current_event or faust.current_event()
        if event is None:
            return  # not from a topic (a test context, an in-memory channel): nothing to park
        await self.dead_letter_message(event.message, exc)

    async def dead_letter_message(self, message: Any, exc: BaseException) -> None:
        """Send ``message`` as received (key, value) to the DLQ; wait for Kafka's ack."""
        if self.jobs_config is None:
            return
        headers = [
            ("error", f"{type(exc).__name__}: {exc}".encode()[:4096]),
            ("source", str(message.topic).encode()),
            ("partition", str(message.partition).encode()),
            ("offset", str(message.offset).encode()),
            ("job", self.jobs_config.job.encode()),
        ]
        sent = await self.dlq().send(key=message.key, value=message.value, headers=headers)
        await sent


def _registry_view(table: RegistryTable) -> type[View]:
    class RegistryView(View):
        """``GET /devices/<id>/`` on the job's web view: the registry entry this worker holds
        for the device and its group path (404 if it holds none)."""

        async def get(self, request: Request, device_id: str) -> Response:
            entry = table.get(device_id)
            if entry is None:
                return self.json({"device_id": device_id, "group_path": None}, status=404)
            return self.json({**entry, "group_path": table.group_of(device_id)})

    return RegistryView


class PlatformTopics:
    """The platform's topics on the app, by attribute: ``topics.telemetry``, ``topics.alerts``.

    The attribute is the topic name without ``.raw``, dots as underscores; ``topics["name"]``
    takes the topic name itself. Made on first use (after the app is configured), one each.
    """

    def __init__(self, app: JobsApp) -> None:
        self._app = app
        self._made: dict[str, faust.TopicT] = {}

    def __getitem__(self, name: str) -> faust.TopicT:
        topic = self._made.get(name)
        if topic is None:
            topic = self._made[name] = self._app.platform_topic(name)
        return topic

    def __getattr__(self, attribute: str) -> faust.TopicT:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        for name in self._app.catalogue():
            if attribute_name(name) == attribute:
                return self[name]
        raise AttributeError(f"no platform topic {attribute!r} (known: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return sorted(attribute_name(name) for name in self._app.catalogue())
