"""`python -m infra.entrypoints.bridge [REPLICA] [--retire]`: one MQTT -> Kafka bridge replica
(ingest/bridge.py) with the stack's settings."""

from __future__ import annotations

import logging
import sys

from infra.metrics import serve_process_metrics
from infra.services.mosquitto import BrokerFiles
from infra.settings import Settings, load_settings
from ingest.bridge import BridgeConfig, serve


def bridge_config(settings: Settings) -> BridgeConfig:
    return BridgeConfig(
        host=settings.host,
        mqtt_port=settings.mqtt_port,
        mqtt_max_inflight=settings.mqtt_max_inflight,
        read_coalesce_s=settings.bridge_read_coalesce_ms / 1000,
        bootstrap_servers=settings.bootstrap_servers,
        registry_url=settings.registry_url,
        run_dir=settings.run_dir,
        identities=BrokerFiles(settings.state_dir / "mosquitto", settings.pki_dir).identities,
        ts_max_age_s=settings.ts_max_age_s,
        ts_max_ahead_s=settings.ts_max_ahead_s,
    )


def main(replica: int = 0, retire: bool = False) -> None:
    """Run replica ``replica`` (exit non-zero if it found itself deaf); with ``retire``, drain
    and end its session instead (exit 0 once retired, 1 if it could not be drained in time)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings()
    raise SystemExit(
        serve(
            bridge_config(settings),
            replica,
            retire,
            expose=lambda bridge: serve_process_metrics(settings, bridge.metrics),
        )
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args and args[0].isdigit() else 0, retire="--retire" in args)
