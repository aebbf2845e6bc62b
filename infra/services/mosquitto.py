"""Mosquitto (Debian package) with a generated config: MQTT 5 over mTLS only.

Every client shows a certificate signed by the fleet CA; its CN becomes its username
(`use_identity_as_username`) and its client id too (`use_username_as_clientid`), whatever id it
asked for. A client id is what MQTT sessions are keyed on, and a newcomer with the id of an open
connection takes that connection over: so no device can disconnect another device or a platform
client, nor take over a persistent session (the bridge's queue), by asking for its id.

The ACL lets a device touch `devices/<its CN>/#` only, while the platform identities may use
every topic: `orchestrator` (tests, benchmarks, tools) and one identity per bridge replica
(`bridge-0`, `bridge-1`, ...: with the client id bound to the identity, replicas sharing one
would take each other over). Those names are reserved (schemas/identity.py): no device can get one.
All are issued on the platform side by `fleet up`. One identity holds one connection at a time.
Revoked serials are refused through the CRL, which the broker reads again on SIGHUP.

A CRL reload refuses new connections but leaves open ones alone, so the broker also loads the
dynamic-security plugin shipped with Mosquitto 2, used only as a control API to end sessions:
the enforcer identities (ingest/enforcement.py; a running enforcer claims a free one with
:func:`~ingest.mqtt_client.claim_identity`), and no other, may publish to its control topic.
The plugin starts from an empty configuration on every start (no clients, roles or groups, every
default access false): with `use_identity_as_username` it never authenticates anyone, and for a
username it does not know it defers every ACL check, so the ACL file decides exactly as before.

Subscriptions: Mosquitto 2.0's ACL file grants every SUBSCRIBE and filters only at delivery, so a
device subscribed to the bridges' `$share/ingest/...` group took its round-robin share of every
device's telemetry and the delivery check dropped it. A small plugin of ours
(mosquitto_subscribe_acl.c, compiled on `fleet up` against Debian's mosquitto-dev headers) refuses
with 0x87 any SUBSCRIBE of a device outside `devices/<its CN>` and below, `$share/...` included;
platform identities and allowed filters it defers to the plugins and ACL file after it.

Size: `message_size_limit` is the envelope's payload limit (ingest/envelope.py), so an oversize
QoS 1 publish is answered PUBACK 0x95 (packet too large) and dropped by the broker, which keeps
the connection (0x95 is no PUBACK code in MQTT 5: paho takes it as malformed; README). The bridge
never sees it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.services.base import Service, ServiceError
from infra.settings import Settings
from ingest.envelope import MAX_PAYLOAD_BYTES
from ingest.mqtt_client import (
    DYNSEC_RESPONSE_TOPIC,
    DYNSEC_TOPIC,
    IdentityFiles,
    client_tls_context,
)
from schemas.identity import BRIDGE_IDENTITIES, ENFORCER, ENFORCER_IDENTITIES, ORCHESTRATOR

# Every client identity the platform issues itself (all reserved in schemas/identity.py).
PLATFORM_IDENTITIES = (ORCHESTRATOR, *ENFORCER_IDENTITIES, *BRIDGE_IDENTITIES)
DYNSEC_PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Where Debian's mosquitto package puts it (multiarch), then other common places.
_DYNSEC_PLUGIN_GLOBS = ("/usr/lib/*-linux-gnu", "/usr/lib", "/usr/lib64", "/usr/local/lib")
# Our subscribe ACL plugin (see the module docstring): its source, and the broker plugin headers
# it is built against (Debian: mosquitto-dev, libmosquitto-dev).
SUBSCRIBE_ACL_SOURCE = Path(__file__).with_name("mosquitto_subscribe_acl.c")
_PLUGIN_HEADERS = (
    Path("/usr/include/mosquitto_plugin.h"),
    Path("/usr/include/mosquitto_broker.h"),
    Path("/usr/include/mosquitto.h"),
)
# A device's own subtree is DEVICE_TOPIC_PREFIX + its CN (the same as the ACL file's pattern).
DEVICE_TOPIC_PREFIX = "devices/"


def dynsec_plugin_path() -> Path:
    """The dynamic-security plugin of the installed Mosquitto (Debian's path if none is found)."""
    for pattern in _DYNSEC_PLUGIN_GLOBS:
        for directory in sorted(Path("/").glob(pattern.lstrip("/"))):
            candidate = directory / DYNSEC_PLUGIN_NAME
            if candidate.exists():
                return candidate
    return Path("/usr/lib/x86_64-linux-gnu") / DYNSEC_PLUGIN_NAME


@dataclass(frozen=True)
class BrokerFiles:
    """Where the broker's config, ACL, TLS material and persistence live."""

    home: Path
    pki_dir: Path

    @property
    def config(self) -> Path:
        return self.home / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.home / "acl"

    @property
    def persistence(self) -> Path:
        return self.home / "data"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.pki_dir / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.pki_dir / "broker" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.pki_dir / "broker" / "server.key"

    @property
    def dynsec_config(self) -> Path:
        return self.home / "dynamic-security.json"

    @property
    def plugin_dir(self) -> Path:
        return self.home / "plugins"

    @property
    def identities(self) -> IdentityFiles:
        """The platform identities' files (ingest/mqtt_client.py): what a client loads."""
        return IdentityFiles(self.pki_dir)

    def identity_cert(self, name: str) -> Path:
        """The certificate of platform identity ``name`` (see PLATFORM_IDENTITIES)."""
        return self.identities.identity_cert(name)

    def identity_key(self, name: str) -> Path:
        return self.identities.identity_key(name)

    @property
    def enforcer_cert(self) -> Path:
        return self.identity_cert(ENFORCER)

    @property
    def enforcer_key(self) -> Path:
        return self.identity_key(ENFORCER)

    @property
    def orchestrator_cert(self) -> Path:
        return self.identity_cert(ORCHESTRATOR)

    @property
    def orchestrator_key(self) -> Path:
        return self.identity_key(ORCHESTRATOR)


def render_acl(
    orchestrators: Sequence[str] = (ORCHESTRATOR, *BRIDGE_IDENTITIES),
    enforcers: Sequence[str] = ENFORCER_IDENTITIES,
) -> str:
    """Deny by default: a device gets its own subtree, the orchestrator and bridges everything.

    An enforcer gets the dynamic-security control topic only (`#` never matches `$` topics, so
    no orchestrator, bridge or device can reach it).
    """
    lines = ["# generated by fleetstream: edits are overwritten on `fleet up`"]
    for name in orchestrators:
        lines += [
            f"user {name}",
            "topic readwrite #",
            "topic readwrite $share/#",
            "topic read $SYS/#",
        ]
    for name in enforcers:
        lines += [
            f"user {name}",
            f"topic write {DYNSEC_TOPIC}",
            f"topic read {DYNSEC_RESPONSE_TOPIC}",
        ]
    lines += [
        "",
        "# every other identity (a device, CN = device id) sees only its own topics",
        f"pattern readwrite {DEVICE_TOPIC_PREFIX}%u/#",
    ]
    return "\n".join(lines) + "\n"


def render_dynsec_config() -> str:
    """The dynamic-security plugin's starting state: it knows no one and grants nothing."""
    access = {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": False,
    }
    config = {"defaultACLAccess": access, "clients": [], "groups": [], "roles": []}
    return json.dumps(config, indent=2) + "\n"


def build_subscribe_acl_plugin(out_dir: Path, source: Path = SUBSCRIBE_ACL_SOURCE) -> Path:
    """The subscribe ACL plugin compiled into ``out_dir`` (kept while source and headers match)."""
    missing = [str(h) for h in _PLUGIN_HEADERS if not h.exists()]
    if missing:
        raise ServiceError(
            f"mosquitto's plugin headers are missing ({', '.join(missing)}): "
            "apt-get install mosquitto-dev libmosquitto-dev"
        )
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ServiceError("no C compiler to build the subscribe ACL plugin: apt-get install gcc")
    digest = hashlib.sha256(source.read_bytes())
    for header in _PLUGIN_HEADERS:  # the broker's ABI comes with its headers (same package)
        digest.update(header.read_bytes())
    target = out_dir / f"fleet_subscribe_acl-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    flags = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"]
    done = subprocess.run(
        [compiler, *flags, "-o", str(partial), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ServiceError(f"building {source.name} failed: {done.stderr.strip()[-2000:]}")
    partial.replace(target)  # atomic: a concurrent `fleet up` never loads half a file
    return target


def render_config(
    settings: Settings,
    files: BrokerFiles,
    run_as: str,
    dynsec_plugin: Path | None = None,
    subscribe_acl_plugin: Path | None = None,
) -> str:
    plugin = dynsec_plugin or dynsec_plugin_path()
    subscribe_acl = subscribe_acl_plugin or files.plugin_dir / "fleet_subscribe_acl.so"
    return "\n".join(
        [
            "# generated by fleetstream (infra/services/mosquitto.py): edits are overwritten",
            f"user {run_as}",
            "per_listener_settings false",
            "allow_anonymous false",
            # First plugin line, first asked: a device's SUBSCRIBE outside its own subtree is
            # refused (0x87), `$share/...` included; everything else goes on to what follows.
            f"plugin {subscribe_acl}",
            f"plugin_opt_subtree_prefix {DEVICE_TOPIC_PREFIX}",
            f"plugin_opt_platform_identities {','.join(PLATFORM_IDENTITIES)}",
            # A control API only (see the module docstring): ends sessions by certificate
            # identity for ingest/enforcement.py. Plugins are asked before the ACL file; this
            # one defers every check for a user it does not know (all of them).
            f"plugin {plugin}",
            f"plugin_opt_config_file {files.dynsec_config}",
            "persistence true",
            f"persistence_location {files.persistence}/",
            "autosave_interval 5",
            "persistent_client_expiration 7d",
            # The in-flight window caps a bridge connection's throughput (ARCHITECTURE.md).
            f"max_inflight_messages {settings.mqtt_max_inflight}",
            f"max_queued_messages {settings.mqtt_max_queued}",
            "max_packet_size 1048576",
            # Refused at the broker (PUBACK 0x95), never handed to the bridge: the envelope's
            # own limit, so nothing the bridge would reject as oversize is acknowledged.
            f"message_size_limit {MAX_PAYLOAD_BYTES}",
            "set_tcp_nodelay true",
            f"acl_file {files.acl}",
            # stderr, unbuffered: a line is in the service log (stdout and stderr both go
            # there) as it happens. stdout into a file is block-buffered, so connection
            # messages (who connected under which client id) showed up kilobytes late.
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "",
            f"listener {settings.mqtt_port} {settings.host}",
            "protocol mqtt",
            f"cafile {files.ca_cert}",
            f"certfile {files.server_cert}",
            f"keyfile {files.server_key}",
            f"crlfile {files.crl}",
            "require_certificate true",
            "use_identity_as_username true",
            # Client id := username (the CN): nobody takes over a connection or session of
            # another identity. Per listener in 2.0, and set on the only one there is.
            "use_username_as_clientid true",
            "tls_version tlsv1.2",
            "",
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def ensure_broker_identities(ca: CertificateAuthority, files: BrokerFiles) -> None:
    """The broker's server certificate and the platform's client identities, made once.

    Every platform identity, whether or not it will run: the ACL names each of them, and a
    bridge replica started later (more FLEET_BRIDGE_REPLICAS) finds its certificate ready.
    """
    if not files.server_cert.exists():
        key_pem, cert_pem = ca.issue_server_certificate()
        _write_private(files.server_key, key_pem)
        files.server_cert.write_bytes(cert_pem)
    for name in PLATFORM_IDENTITIES:
        if not files.identity_cert(name).exists():
            key_pem, cert_pem = ca.issue_identity(name)
            _write_private(files.identity_key(name), key_pem)
            files.identity_cert(name).write_bytes(cert_pem)


class Mosquitto(Service):
    def __init__(self, settings: Settings) -> None:
        super().__init__("mosquitto", settings.host, settings.mqtt_port, settings.run_dir)
        self.settings = settings
        self.files = BrokerFiles(home=settings.state_dir / "mosquitto", pki_dir=settings.pki_dir)

    def _binary(self) -> str:
        found = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if found is None:
            raise ServiceError("mosquitto is not installed: apt-get install mosquitto")
        return found

    def prepare(self) -> None:
        ca = CertificateAuthority.load_or_create(
            self.settings.pki_dir, passphrase=key_passphrase(self.settings)
        )
        ca.refresh_crl()  # an expired CRL would make OpenSSL refuse every client
        ensure_broker_identities(ca, self.files)
        self.files.persistence.mkdir(parents=True, exist_ok=True)
        plugin = dynsec_plugin_path()
        if not plugin.exists():
            raise ServiceError(
                f"mosquitto's dynamic-security plugin is missing ({plugin}); it ships with "
                "Debian's mosquitto 2 package: apt-get install mosquitto"
            )
        subscribe_acl = build_subscribe_acl_plugin(self.files.plugin_dir)
        self.files.acl.write_text(render_acl())
        # Fresh on every start: whatever the plugin was told last time is forgotten.
        _write_private(self.files.dynsec_config, render_dynsec_config().encode())
        self.files.config.write_text(
            render_config(self.settings, self.files, getpass.getuser(), plugin, subscribe_acl)
        )

    def command(self) -> Sequence[str]:
        return [self._binary(), "-c", str(self.files.config)]

    def ready(self) -> bool:
        # A TLS handshake with the orchestrator's certificate: the listener and its PKI work.
        if not super().ready():
            return False
        try:
            context = client_tls_context(
                self.files.ca_cert, self.files.orchestrator_cert, self.files.orchestrator_key
            )
            with (
                socket.create_connection((self.host, self.port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                return True
        except (OSError, ssl.SSLError):
            return False

    def reload(self) -> None:
        """SIGHUP: the broker reads its config, ACL and CRL again."""
        self.signal(signal.SIGHUP)

    def version(self) -> str | None:
        try:
            out = subprocess.run(
                [self._binary(), "-h"], capture_output=True, text=True, timeout=5
            ).stdout
        except (OSError, ServiceError):
            return None
        match = re.search(r"mosquitto version (\S+)", out)
        return match.group(1) if match else None
