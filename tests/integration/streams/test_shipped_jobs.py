"""The Faust jobs shipped with the platform, as `fleet up` runs them: fleet health and alert
webhooks on the real stack, and `fleet status` showing them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from confluent_kafka import Message, Producer

from infra.api.client import HotPathClient
from infra.keys import key_passphrase
from infra.pki import CertificateAuthority
from infra.provision import DeviceCredentials, load_or_provision, register
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.simulator.fleet import run_fleet
from infra.stack import Stack
from infra.topics import unread_records
from streams.jobs.webhooks import CONFIG_FILE, IDEMPOTENCY_HEADER
from tests.conftest import settings_env
from tests.support.fleet import telemetry_sent
from tests.support.kafka import collect

pytestmark = pytest.mark.integration


def _registered(
    stack: Stack,
    client: HotPathClient,
    settings: Settings,
    tmp_path: Path,
    org: str,
    project: str,
    groups: dict[str, int],
) -> dict[str, list[DeviceCredentials]]:
    """Devices per group, registered through the registry agent, and seen by the registry table
    of alert_webhooks (its web view answers /devices/<id>/). fleet_health reads no registry:
    the hot path names the group in its digests, from the registration it applied itself."""
    ca = CertificateAuthority.load_or_create(settings.pki_dir, passphrase=key_passphrase(settings))
    out: dict[str, list[DeviceCredentials]] = {}
    for group, count in groups.items():
        ids = [f"{project}-{group}-{i}" for i in range(count)]
        creds = load_or_provision(ca, ids, tmp_path, "ec")
        audits = register(client, creds, org, project, group)
        assert {a.decision for a in audits.values()} == {"applied"}, audits
        out[group] = creds

    def seen(port: int, device_id: str) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{settings.host}:{port}/devices/{device_id}/", timeout=5
            ) as answer:
                return bool(json.loads(answer.read())["group_path"])
        except OSError:
            return False

    last = [c.device_id for creds in out.values() for c in creds]
    for job in [j for j in stack.jobs if j.name == "job-alert-webhooks"]:
        assert wait_until(
            lambda port=job.port: all(seen(port, d) for d in last), timeout=60, interval=0.5
        ), f"{job.name} never saw the registered devices"
    return out


# --- fleet health -----------------------------------------------------------------------------


def test_fleet_health_windows_count_every_message_of_each_group(
    stack: Stack, client: HotPathClient, settings: Settings, tmp_path: Path
) -> None:
    org, project = "acme", f"fh{uuid.uuid4().hex[:6]}"
    groups = {"g1": 3, "g2": 2}
    fleet = _registered(stack, client, settings, tmp_path, org, project, groups)
    stats, devices = asyncio.run(
        run_fleet(
            settings, [c for cs in fleet.values() for c in cs], rate=5, duration=30, max_messages=12
        )
    )
    assert stats.connect_failures == 0
    published = telemetry_sent(devices)
    group_of = {c.device_id: f"{org}/{project}/{g}" for g, cs in fleet.items() for c in cs}
    expected = Counter(group_of[device] for device, _seq in published)
    assert sum(expected.values()) == 5 * 12

    def latest(messages: list[Message]) -> dict[str, dict[str, Any]]:
        out = {}
        for m in messages:  # compacted and keyed by group@window: the last one stands
            out[m.key().decode()] = json.loads(m.value())
        return out

    def totals(messages: list[Message]) -> Counter[str]:
        counts: Counter[str] = Counter()
        for window in latest(messages).values():
            counts[window["group"]] += window["messages"]
        return counts

    prefix = f"{org}/{project}/".encode()
    seen = collect(
        settings,
        "fleet.health",
        keep=lambda m: m.key().startswith(prefix),
        done=lambda got: totals(got) == expected,
        timeout=150,
    )
    assert totals(seen) == expected, latest(seen)
    for key, window in latest(seen).items():
        group = window["group"]
        assert key == f"{group}@{window['window_start']}"
        assert 1 <= window["devices"] <= groups[group.rsplit("/", 1)[1]]
        assert window["window_end_ms"] - window["window_start_ms"] == 60_000
        temperature = window["metrics"]["temperature"]
        assert temperature["min"] <= temperature["mean"] <= temperature["max"]
    # The same windows on the worker's web view.
    health = stack.jobs[0]
    served: Counter[str] = Counter()
    for group in expected:
        url = f"http://{settings.host}:{health.port}/fleet-health/?group={group}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            served[group] = sum(w["messages"] for w in json.loads(answer.read()))
    assert served == expected
    # Its commits reach the end of the digests, commit markers and all (Faust's own gap
    # booking crawled one transaction per commit interval: streams/jobs/transport.py).
    assert wait_until(
        lambda: unread_records(settings, "fleet_health", ["telemetry.digests"]) == 0,
        timeout=30,
        interval=0.5,
    )


# --- alert webhooks ---------------------------------------------------------------------------


@dataclass
class Receiver:
    """A local HTTP endpoint per path; `/flaky` answers 503 until `healthy_at`."""

    port: int = 0
    healthy_at: float = float("inf")
    requests: list[tuple[str, str, dict[str, Any], float]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        now = time.monotonic()
        self.requests.append((request.path, request.headers[IDEMPOTENCY_HEADER], body, now))
        if request.path == "/refuse":
            return web.Response(status=400, text="no such hook")
        if request.path == "/flaky" and now < self.healthy_at:
            return web.Response(status=503, text="down for a while")
        return web.Response(status=204)

    def keys(self, path: str) -> set[str]:
        return {key for p, key, _b, _t in list(self.requests) if p == path}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner: list[web.AppRunner] = []

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/{hook}", got.handle)
        run = web.AppRunner(app)
        await run.setup()
        site = web.TCPSite(run, "127.0.0.1", 0)
        await site.start()
        got.port = run.addresses[0][1]
        runner.append(run)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    assert ready.wait(30)
    yield got
    asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def _alert(device_id: str, n: int, status: str, run: str) -> dict[str, Any]:
    return {
        "alert_id": f"{run}-{device_id}-{n}",
        "device_id": device_id,
        "rule_id": "hot",
        "status": status,
        "metric": "temperature",
        "value": 45.0 if status == "raised" else 20.0,
        "threshold": 40.0,
        "severity": "critical",
        "seq": n,
        "ts": int(time.time() * 1000),
    }


def test_alert_webhooks_deliver_every_alert_at_least_once_per_group(
    stack: Stack, client: HotPathClient, settings: Settings, tmp_path: Path, receiver: Receiver
) -> None:
    org, project = "acme", f"wh{uuid.uuid4().hex[:6]}"
    fleet = _registered(
        stack,
        client,
        settings,
        tmp_path,
        org,
        project,
        {"up": 1, "flaky": 1, "refuse": 1, "gone": 1},
    )
    base = f"http://127.0.0.1:{receiver.port}"
    group = f"{org}/{project}"
    flaky = {"url": f"{base}/flaky", "backoff_s": 0.2, "max_backoff_s": 1}
    # Nothing listens on port 9: refused connections until the attempts are spent.
    gone = {"url": "http://127.0.0.1:9/", "max_attempts": 2, "backoff_s": 0.1}
    config = {
        "endpoints": {
            f"{group}/up": {"url": f"{base}/up"},
            f"{group}/flaky": flaky,
            f"{group}/refuse": {"url": f"{base}/refuse"},
            f"{group}/gone": gone,
        }
    }
    path = settings.state_dir / "jobs" / "alert_webhooks" / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))

    from confluent_kafka.schema_registry import SchemaRegistryClient

    from schemas.codec import CodecRegistry, load_schema

    codec = CodecRegistry(SchemaRegistryClient({"url": settings.registry_url})).codec(
        "alerts", load_schema("Alert")
    )
    run = uuid.uuid4().hex[:6]
    sent: dict[str, set[str]] = defaultdict(set)  # group -> idempotency keys
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    receiver.healthy_at = time.monotonic() + 10  # /flaky answers 503 for 10 s from here
    for group, creds in fleet.items():
        device = creds[0].device_id
        for n in range(5):
            for status in ("raised", "resolved"):
                alert = _alert(device, n, status, run)
                producer.produce("alerts", key=device.encode(), value=codec.encode(alert))
                sent[group].add(f"{alert['alert_id']}:{status}")
    assert producer.flush(30) == 0

    def delivered() -> bool:
        return all(receiver.keys(f"/{g}") >= sent[g] for g in ("up", "flaky"))

    assert wait_until(delivered, timeout=120, interval=0.5), {
        g: len(receiver.keys(f"/{g}")) for g in ("up", "flaky")
    }
    # Every alert delivered; repeats only with the same key, and the same body for a key.
    for group in ("up", "flaky"):
        assert receiver.keys(f"/{group}") == sent[group]
    bodies: dict[str, dict[str, Any]] = {}
    for p, key, body, _at in receiver.requests:
        assert f"{body['alert_id']}:{body['status']}" == key
        assert bodies.setdefault(key, body) == body
        assert body["group"] == f"{org}/{project}{p}"
    # The flaky endpoint did not hold the healthy group back: all of `/up` arrived before
    # `/flaky` recovered (or `/up` was not delayed by it).
    up_times = [t for p, _k, _b, t in receiver.requests if p == "/up"]
    assert max(up_times) < receiver.healthy_at, "the healthy group waited for the flaky one"
    tried = [t for p, _k, _b, t in receiver.requests if p == "/flaky"]
    assert any(t < receiver.healthy_at for t in tried)  # it was tried while down

    # The refused and the unreachable groups' alerts are parked, as received, with the reason.
    devices = {fleet["refuse"][0].device_id: "HTTP 400", fleet["gone"][0].device_id: "gave up"}
    parked = collect(
        settings,
        "dlq.jobs.alert_webhooks",
        keep=lambda m: m.key().decode() in devices,
        done=lambda got: len(got) >= 20,
        timeout=120,
    )
    assert len(parked) == 20
    for m in parked:
        headers = {k: v.decode() for k, v in m.headers() or []}
        assert devices[m.key().decode()] in headers["error"], headers
        assert headers["source"] == "alerts"
        assert headers["job"] == "alert_webhooks"
    assert receiver.keys("/refuse") == sent["refuse"]  # each tried once: a 4xx is final
    assert Counter(k for p, k, _b, _t in receiver.requests if p == "/refuse") == Counter(
        sent["refuse"]
    )


# --- fleet status -----------------------------------------------------------------------------


def test_fleet_status_lists_the_shipped_jobs_with_their_lag(
    stack: Stack, settings: Settings
) -> None:
    status = subprocess.run(
        [sys.executable, "-m", "infra.cli", "status", "--json"],
        cwd=PROJECT_ROOT,
        env=settings_env(settings),
        capture_output=True,
        timeout=120,
    )
    report = json.loads(status.stdout.decode().strip().splitlines()[-1])
    services = {s["name"]: s for s in report["services"]}
    for job in stack.jobs:
        assert services[job.name]["state"] == "up"
        assert services[job.name]["port"] == job.port
        assert services[job.name]["pid"] == job.process().pid  # type: ignore[union-attr]
    assert {"fleet_health", "alert_webhooks"} <= set(report["consumer_lag"])
    assert all(
        isinstance(report["consumer_lag"][j], int) for j in ("fleet_health", "alert_webhooks")
    )
