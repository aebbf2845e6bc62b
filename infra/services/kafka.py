"""Apache Kafka in KRaft mode, from the jars Maven resolved (infra/kafka/pom.xml).

One node is broker and controller at once. With one broker the quorum is bootstrapped with
`StorageTool format --standalone`; with three, the controllers form a static quorum
(`controller.quorum.voters`) and topics get replication factor 3, `min.insync.replicas=2`.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient

from infra.services.base import Service, ServiceError
from infra.services.java import find_java, maven_fetch
from infra.settings import PROJECT_ROOT, Settings

KAFKA_POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
KAFKA_LOG4J = PROJECT_ROOT / "infra" / "kafka" / "log4j2.xml"
KAFKA_MIN_JAVA = 17


def kafka_libs(settings: Settings) -> Path:
    return settings.lib_dir / "kafka"


def ensure_kafka_jars(settings: Settings) -> Path:
    libs = kafka_libs(settings)
    maven_fetch(KAFKA_POM, "dependency:copy-dependencies", libs, {"kafka.libs": str(libs)})
    return libs


def _installed_version(libs: Path) -> str | None:
    for jar in libs.glob("kafka_2.13-*.jar"):
        match = re.match(r"kafka_2\.13-(.+)\.jar$", jar.name)
        if match:
            return match.group(1)
    return None


def server_properties(settings: Settings, index: int, data_dir: Path) -> str:
    host = settings.host
    node_id = index + 1
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": (
            f"PLAINTEXT://{host}:{settings.broker_port(index)},"
            f"CONTROLLER://{host}:{settings.controller_port(index)}"
        ),
        "advertised.listeners": f"PLAINTEXT://{host}:{settings.broker_port(index)}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": str(settings.default_partitions),
        "default.replication.factor": str(settings.replication_factor),
        "min.insync.replicas": str(settings.min_insync_replicas),
        "offsets.topic.replication.factor": str(settings.replication_factor),
        "transaction.state.log.replication.factor": str(settings.replication_factor),
        "transaction.state.log.min.isr": str(settings.min_insync_replicas),
        "share.coordinator.state.topic.replication.factor": str(settings.replication_factor),
        "share.coordinator.state.topic.min.isr": str(settings.min_insync_replicas),
        "group.initial.rebalance.delay.ms": "0",
        # Producers of the platform are idempotent with acks=all; never auto-create a topic
        # by a typo: topics are declared in schemas/topics.py.
        "auto.create.topics.enable": "false",
        "log.retention.hours": "168",
        # Idle CPU (bench ledger): the active controller appends a no-op record to the
        # metadata log every 500 ms by default, which every broker then fetches; 5 s is
        # plenty to show the controller is alive.
        "metadata.max.idle.interval.ms": "5000",
        # Two cores shared by the whole stack: fewer threads to wake.
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    if settings.brokers == 1:
        lines["controller.quorum.bootstrap.servers"] = f"{host}:{settings.controller_port(0)}"
    else:
        lines["controller.quorum.voters"] = ",".join(
            f"{i + 1}@{host}:{settings.controller_port(i)}" for i in range(settings.brokers)
        )
    return "".join(f"{key}={value}\n" for key, value in lines.items())


class KafkaBroker(Service):
    def __init__(self, settings: Settings, index: int) -> None:
        name = f"kafka-{index}"
        super().__init__(name, settings.host, settings.broker_port(index), settings.run_dir)
        self.settings = settings
        self.index = index
        self.home = settings.state_dir / "kafka" / name
        self.libs = kafka_libs(settings)

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def extra_ports(self) -> Sequence[int]:
        return (self.settings.controller_port(self.index),)

    def _java(self) -> Path:
        return find_java(KAFKA_MIN_JAVA, self.settings.java_home)

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def cluster_id(self) -> str:
        """One id for the whole cluster, kept beside the brokers' folders."""
        path = self.settings.state_dir / "kafka" / "cluster.id"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Kafka's cluster ids are base64 uuids; uuid4 hex trimmed works as well.
            path.write_text(uuid.uuid4().hex[:22])
        return path.read_text().strip()

    def prepare(self) -> None:
        ensure_kafka_jars(self.settings)
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(server_properties(self.settings, self.index, self.data_dir))
        if (self.data_dir / "meta.properties").exists():
            return  # formatted once; formatting again would refuse or wipe the cluster id
        argv = [
            str(self._java()),
            "-cp",
            self._classpath(),
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id(),
            "-c",
            str(self.config_path),
            "--ignore-formatted",
        ]
        if self.settings.brokers == 1:
            argv.append("--standalone")
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(
                f"{self.name}: formatting storage failed:\n{result.stdout}{result.stderr}"
            )

    def command(self) -> Sequence[str]:
        return [
            str(self._java()),
            f"-Xmx{self.settings.kafka_heap}",
            f"-Xms{self.settings.kafka_heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.config_path),
        ]

    def environment(self) -> Mapping[str, str]:
        return {}

    def ready(self) -> bool:
        if not super().ready():
            return False
        admin = AdminClient({"bootstrap.servers": f"{self.host}:{self.port}"})
        try:
            meta = admin.list_topics(timeout=2)
        except Exception:  # noqa: BLE001 - any failure means "not answering yet"
            return False
        return len(meta.brokers) == self.settings.brokers

    def version(self) -> str | None:
        return _installed_version(self.libs)
