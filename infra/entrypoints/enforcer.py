"""`python -m infra.entrypoints.enforcer`: the broker enforcer (ingest/enforcement.py) with the
stack's settings: the fleet CA, the broker to reload and the registry's table passed in."""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Message

from infra.keys import key_passphrase
from infra.pki import CRL_VALIDITY_DAYS, CertificateAuthority
from infra.process import process_main
from infra.services.base import ServiceError
from infra.services.mosquitto import BrokerFiles, Mosquitto, ensure_broker_identities
from infra.settings import Settings
from ingest.enforcement import EnforcementError, Enforcer, EnforcerConfig
from streams.tables import GlobalTable


def enforcer_config(settings: Settings) -> EnforcerConfig:
    return EnforcerConfig(
        host=settings.host,
        mqtt_port=settings.mqtt_port,
        registry_url=settings.registry_url,
        run_dir=settings.run_dir,
        identities=BrokerFiles(settings.state_dir / "mosquitto", settings.pki_dir).identities,
        crl_validity_days=CRL_VALIDITY_DAYS,
    )


def build_enforcer(settings: Settings) -> Enforcer:
    """The enforcer of this stack's broker; EnforcementError if the stack has no CA yet."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    pki = settings.pki_dir
    if not (pki / "ca.key").exists() or not (pki / "ca.crt").exists():
        raise EnforcementError(f"no fleet CA in {pki}: start the stack first (fleet up)")
    ca = CertificateAuthority.load_or_create(pki, passphrase=key_passphrase(settings))
    broker = Mosquitto(settings)
    ensure_broker_identities(ca, broker.files)  # the enforcer's own identity

    def reload_broker() -> None:
        try:
            broker.reload()
        except ServiceError as exc:  # not running: the enforcer retries
            raise EnforcementError(str(exc)) from exc

    def open_table(topic: str, apply: Callable[[Message], None]) -> GlobalTable:
        return GlobalTable(settings, topic, apply)

    return Enforcer(enforcer_config(settings), ca, reload_broker, open_table)


def main() -> None:
    process_main("enforcer", build_enforcer)


if __name__ == "__main__":
    main()
