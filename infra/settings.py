"""The one settings object: every address, port and path comes from here.

Values are read from `FLEET_` environment variables (for instance `FLEET_KAFKA_PORT=19092`),
so a test or an operator can move a whole stack without touching code.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The checkout this package lives in: state and downloaded jars stay inside it, git-ignored.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where the platform's services live and how they are sized."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    state_dir: Path = PROJECT_ROOT / ".state" / "stack"
    lib_dir: Path = PROJECT_ROOT / ".state" / "lib"

    # Kafka: broker i (0-based) listens on kafka_port + 2*i, its controller on the next port.
    brokers: int = Field(default=1, ge=1, le=5)
    kafka_port: int = 9092
    kafka_heap: str = "512m"
    default_partitions: int = Field(default=6, ge=1)

    registry_port: int = 8081
    registry_management_port: int = 9001
    registry_heap: str = "384m"

    mqtt_port: int = 8883
    # Bridge replicas `fleet up` runs: they share the uplinks through MQTT shared subscriptions.
    bridge_replicas: int = Field(default=1, ge=1, le=8)
    mqtt_max_inflight: int = Field(default=1000, ge=1)
    mqtt_max_queued: int = Field(default=100_000, ge=0)
    # A bridge reads the broker's socket at most once per this window (0: on every arrival):
    # the messages of a window cost one wake-up, TLS read and parse pass (ingest/mqtt_client.py).
    bridge_read_coalesce_ms: int = Field(default=10, ge=0, le=1000)
    # The bridge dead-letters (bad_timestamp) a device `ts` further than this from its receive
    # time (ingest/envelope.py TimestampWindow): back far enough for an offline backlog.
    ts_max_age_s: int = Field(default=30 * 86_400, ge=0)
    ts_max_ahead_s: int = Field(default=300, ge=0)

    # Warehouse: empty means embedded chDB in <state_dir>/warehouse; http(s)://host:port is a
    # ClickHouse server (same sink code through clickhouse-connect);
    # doris://user:pass@host:9030/db?http_port=8030 is Apache Doris (sinks/doris.py: MySQL
    # protocol on 9030, Stream Load on the FE's http_port). The cold path, `fleet sql`, the
    # analyst queries (queries/doris/) and the demo summary follow it.
    warehouse_url: str = ""
    # The process owning the embedded chDB answers `fleet sql` here while it runs.
    query_port: int = 8124
    # Limits of one query on that port (the caller cannot lift them: sinks/sql_guard.py).
    query_timeout_s: float = Field(default=60.0, gt=0)
    query_max_memory_bytes: int = Field(default=2 << 30, ge=1 << 20)
    sink_batch_rows: int = Field(default=50_000, ge=1)
    sink_batch_seconds: float = Field(default=1.0, gt=0)

    # The HTTP API (infra/api/): bearer tokens signed by the platform, loopback only.
    api_port: int = 8090

    # Hot path (alerts, twins): a batch is what arrived within hot_poll_ms (at most
    # hot_max_batch records), written in one transaction; short, for alert latency.
    hot_poll_ms: int = Field(default=20, ge=1)
    hot_max_batch: int = Field(default=5_000, ge=1)
    hot_instance: int = Field(default=0, ge=0)  # its transactional id: one per worker

    # The shipped Faust jobs (fleet_health, alert_webhooks) serve their Faust web view on
    # jobs_web_port and the next port.
    jobs_web_port: int = 6066

    # Prometheus metrics: the stack's processes serve /metrics on metrics_port + their slot
    # (infra/metrics.py; 0 turns them off); process_metrics_port is the one a process serves
    # on, set by `fleet up` for each process it starts (0: none).
    metrics_port: int = Field(default=9400, ge=0)
    process_metrics_port: int = Field(default=0, ge=0)
    # The Prometheus server `fleet up` runs (Debian's prometheus; off: FLEET_PROMETHEUS=false),
    # its scrape and rule-evaluation intervals, how long a platform alert's condition must hold
    # before it fires, and how long it keeps samples.
    prometheus: bool = True
    prometheus_port: int = 9390  # not 9090: a Prometheus of the Debian package may run there
    # 15 s, Prometheus' own example: the 1-minute rates keep four samples, and Prometheus idle
    # fell from about 0.55% of a core to 0.2% (scraping a dozen processes every 5 s; README).
    prometheus_scrape_interval_s: float = Field(default=15.0, gt=0)
    prometheus_evaluation_interval_s: float = Field(default=15.0, gt=0)
    prometheus_alert_for_s: float = Field(default=60.0, ge=0)
    prometheus_retention: str = "7d"

    java_home: Path | None = None
    registry_java_home: Path | None = None

    startup_timeout_s: float = Field(default=120.0, gt=0)

    # Encrypts the fleet CA's and the OTA release key's private keys at rest (infra/keys.py).
    # Unset: a random per-user passphrase in ~/.config/fleetstream/key-passphrase (0600, outside
    # the state folder), with a warning; set it (from a secret store) in a deployment.
    key_passphrase: SecretStr | None = None

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        # The platform's promise on one machine: nothing listens beyond loopback.
        if not value.startswith("127.") and value != "localhost":
            raise ValueError(f"FLEET_HOST must be a loopback address, got {value!r}")
        return value

    # --- derived addresses -------------------------------------------------------------

    def broker_port(self, index: int) -> int:
        return self.kafka_port + 2 * index

    def controller_port(self, index: int) -> int:
        return self.kafka_port + 2 * index + 1

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{self.host}:{self.broker_port(i)}" for i in range(self.brokers))

    @property
    def registry_url(self) -> str:
        """Confluent-compatible API of the schema registry."""
        return f"http://{self.host}:{self.registry_port}/apis/ccompat/v7"

    @property
    def replication_factor(self) -> int:
        return min(self.brokers, 3)

    @property
    def min_insync_replicas(self) -> int:
        return 2 if self.replication_factor >= 3 else 1

    # --- derived paths -----------------------------------------------------------------

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def warehouse_dsn(self) -> str:
        return self.warehouse_url or f"chdb://{self.state_dir / 'warehouse'}"

    @property
    def run_dir(self) -> Path:
        """Pid files and logs of what `fleet up` started."""
        return self.state_dir / "run"


def settings_env(settings: Settings) -> dict[str, str]:
    """The FLEET_ variables that give a child process these same settings."""
    return {
        f"FLEET_{name.upper()}": value.get_secret_value()
        if isinstance(value, SecretStr)
        else str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


def load_settings() -> Settings:
    """Read the settings from the environment (one place, so tests can override)."""
    return Settings()
