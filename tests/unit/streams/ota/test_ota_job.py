"""The OTA controller's job spec on the kit's harness, without Kafka: requests become rollouts,
commands and audit records in one batch; a record that cannot be decoded is dead-lettered to
`dlq.ota` (never taken for a tombstone); a lost batch rewinds to the committed rollouts; and
`fleet status` watches every topic the controller consumes."""

from __future__ import annotations

import json
from typing import Any

from infra.stack import LAG_GROUPS
from infra.topics import TOPICS
from streams.ota.job import (
    ARTIFACTS,
    AUDIT,
    DEVICES,
    DLQ,
    DOWNLINK,
    EVENTS,
    GRANTS,
    INPUTS,
    OTA_GROUP,
    OTA_JOB,
    REQUESTS,
    ROLLOUTS,
    TELEMETRY,
    OtaState,
)
from streams.registry.rbac import GrantSet, Resource, Role
from streams.runtime.testing import JobHarness
from tests.unit.streams.ota.test_ota import (
    APPROVER,
    ARTIFACT,
    FAST,
    OPERATOR,
    ORG,
    PROJECT,
    T0,
    TARGET,
    device,
)

GARBAGE = b"\x07not avro at all"


def harness(devices: int = 4) -> JobHarness[OtaState]:
    """The controller with a fleet, grants and the artifact in its tables, started."""
    h = JobHarness(OTA_JOB)
    for i in range(devices):
        h.table(DEVICES, f"d-{i}", device(f"d-{i}").to_record())
    for grant in (
        GrantSet.of(OPERATOR, (Role.operator, Resource(ORG, PROJECT))),
        GrantSet.of(APPROVER, (Role.ota_approver, Resource(ORG, PROJECT))),
    ):
        h.table(GRANTS, str(grant.principal), grant.to_record())
    h.table(ARTIFACTS, ARTIFACT.artifact_id, ARTIFACT.to_record())
    h.start()
    return h


def request(kind: str, principal: Any, n: int, **fields: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{n}",
        "rollout_id": "r-1",
        "kind": kind,
        "principal": str(principal),
        "artifact_id": fields.get("artifact_id"),
        "target": fields.get("target"),
        "plan": fields.get("plan"),
        "comment": None,
        "ts": T0,
    }


def create(n: int = 0, artifact_id: str = ARTIFACT.artifact_id) -> dict[str, Any]:
    plan = json.dumps(FAST.to_record())
    return request("create", OPERATOR, n, artifact_id=artifact_id, target=str(TARGET), plan=plan)


def headers(output: Any) -> dict[str, bytes]:
    return dict(output.headers)


# ---------------------------------------------------------------- rollouts


def test_a_request_becomes_a_rollout_and_its_approval_sends_commands() -> None:
    h = harness()
    created = h.run((REQUESTS, "r-1", create()), now_ms=T0)
    assert [o.key for o in created.on(ROLLOUTS)] == ["r-1"]
    assert [o.value["decision"] for o in created.on(AUDIT)] == ["applied"]  # type: ignore[index]
    assert created.on(DOWNLINK) == []  # nothing before approval
    assert h.state.status()["states"] == {"r-1": "pending_approval"}

    approved = h.run((REQUESTS, "r-1", request("approve", APPROVER, 1)), now_ms=T0 + 1000)
    assert approved.on(ROLLOUTS)
    assert approved.on(DOWNLINK) == []  # the clock starts the first cohort
    ticked = h.run(now_ms=T0 + 2000, tick=True)
    sent = {o.key for o in ticked.on(DOWNLINK)}
    assert sent
    assert sent <= {f"d-{i}" for i in range(4)}
    assert h.state.counters.commands == len(ticked.on(DOWNLINK))
    assert h.run(now_ms=T0 + 2500).on(DOWNLINK) == []  # no tick: nothing due


def test_an_invalid_request_is_refused_on_the_audit_log() -> None:
    h = harness()
    run = h.run((REQUESTS, "r-1", create(artifact_id="nope")), now_ms=T0)
    [audit] = run.on(AUDIT)
    assert audit.value["decision"] == "refused"  # type: ignore[index]
    assert "unknown artifact" in audit.value["reason"]  # type: ignore[index]
    assert run.on(ROLLOUTS) == []


def test_a_lost_batch_rewinds_to_the_committed_rollouts_and_its_joins_join_again() -> None:
    h = harness()
    committed = h.run((REQUESTS, "r-1", create()), now_ms=T0)
    h.table(DEVICES, "d-9", device("d-9").to_record())
    h.run(now_ms=T0 + 10)  # the batch routing d-9's join: lost
    h.drop_partitions({0, 1})  # the loop rewinds
    assert h.state.rollouts == {}
    assert h.state.joined == ["d-9"]
    [rollout] = committed.on(ROLLOUTS)
    h.table(ROLLOUTS, "r-1", rollout.value)  # restored from ota.rollouts
    assert list(h.state.rollouts) == ["r-1"]


def test_devices_known_at_start_are_not_joins_but_later_ones_are() -> None:
    h = harness()
    assert h.state.joined == []
    h.table(DEVICES, "d-9", device("d-9").to_record())
    assert h.state.joined == ["d-9"]


def test_telemetry_is_never_decoded_only_its_arrival_counts() -> None:
    h = harness()
    seen = h.record(TELEMETRY, "d-1", GARBAGE, timestamp_ms=123)
    run = h.run(seen, now_ms=T0)
    assert run.outputs == []
    assert run.dead_letters == []
    assert h.state.last_seen == {"d-1": 123}


# ---------------------------------------------------------------- dead letters


def test_a_corrupt_registry_record_is_dead_lettered_not_taken_for_a_deletion() -> None:
    h = harness()
    good = device("d-1")
    h.table(DEVICES, "d-1", GARBAGE)
    assert h.state.devices["d-1"] == good  # still there: not a deletion
    h.table(GRANTS, "user:x", b"")
    run = h.run(now_ms=T0)
    assert [(d.source.key, d.source.value, d.reason) for d in run.dead_letters] == [
        (b"d-1", GARBAGE, "bad_magic"),
        (b"user:x", b"", "too_short"),
    ]
    letter = dict(run.dead_letters[0].headers())
    assert letter["source"] == b"ota"
    assert (letter["topic"], letter["offset"]) == (DEVICES.encode(), b"4")
    assert h.table_dead_lettered == 2

    # A tombstone still deletes, and is no dead letter.
    h.table(DEVICES, "d-1", None)
    assert "d-1" not in h.state.devices
    assert h.table_dead_lettered == 2


def test_a_table_record_is_dead_lettered_once_though_read_again() -> None:
    h = harness()
    [rollouts] = [t for t in OTA_JOB.tables if t.topic == ROLLOUTS]
    corrupt = h.record(ROLLOUTS, "r-1", GARBAGE, partition=2)
    for _ in range(2):  # a recovery reads the changelog again
        h.core.apply_table(rollouts, corrupt)
    assert h.table_dead_lettered == 1
    assert len(h.run(now_ms=T0).dead_letters) == 1


def test_an_undecodable_input_is_dead_lettered_in_the_batch() -> None:
    h = harness()
    run = h.run(
        (EVENTS, "d-1", GARBAGE, 2),
        (REQUESTS, "r-1", None),
        (TELEMETRY, "d-1", GARBAGE),
        now_ms=T0,
    )
    dead = run.on(DLQ)
    assert [headers(o)["error"] for o in dead] == [b"bad_magic", b"no_value"]
    assert [headers(o)["topic"] for o in dead] == [EVENTS.encode(), REQUESTS.encode()]
    assert [o.key for o in dead] == [b"d-1", b"r-1"]
    assert h.state.counters.dead_lettered == 2
    assert h.state.counters.dead_letter_reasons == {"bad_magic": 1, "no_value": 1}


# ---------------------------------------------------------------- topics and lag


def test_the_controller_keeps_its_names() -> None:
    assert (OTA_JOB.name, OTA_JOB.group, OTA_JOB.dead_letters) == (
        "ota-controller",
        "fleetstream-ota",
        "dlq.ota",
    )


def test_fleet_status_watches_every_topic_the_controller_consumes() -> None:
    groups = dict(LAG_GROUPS)
    assert set(groups[OTA_GROUP]) == set(INPUTS)
    assert TELEMETRY in groups[OTA_GROUP]


def test_the_controllers_dead_letter_topic_is_declared() -> None:
    by_name = {t.name: t for t in TOPICS}
    assert DLQ in by_name
    assert by_name[DLQ].cleanup == by_name["dlq.hot"].cleanup
