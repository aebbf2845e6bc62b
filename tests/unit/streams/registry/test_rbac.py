"""streams.registry.rbac: the authority model, its properties and the MQTT topic rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import AvroCodec, Decoded, load_schema
from streams.registry.rbac import (
    DEVICE_ACTIONS,
    MQTT_ACTIONS,
    ROLE_ACTIONS,
    Action,
    Grant,
    GrantSet,
    Principal,
    Resource,
    Role,
    authorize,
    index_grants,
    mqtt_topic_allowed,
)

KEYS = ("org", "project", "group", "device")
NAMES = st.sampled_from(["a", "b", "c"])  # few names: collisions make siblings and overlaps


def res(*names: str) -> Resource:
    return Resource(**dict(zip(KEYS, names, strict=False)))


resources = st.lists(NAMES, min_size=1, max_size=4).map(lambda ns: res(*ns))
principals = st.builds(
    Principal, st.sampled_from(["user", "service"]), st.sampled_from(["al", "bo"])
)
roles = st.sampled_from(Role)
actions = st.sampled_from(Action)
ALICE = Principal.user("alice")


def grants_for(principal: Principal, *pairs: tuple[Role, Resource]) -> dict[str, GrantSet]:
    return index_grants([GrantSet.of(principal, *pairs)])


@st.composite
def grant_sets(draw: st.DrawFn) -> GrantSet:
    principal = draw(principals)
    return GrantSet.of(principal, *draw(st.lists(st.tuples(roles, resources), max_size=4)))


@given(principals, actions, resources, st.lists(grant_sets(), max_size=3))
def test_no_grant_denies(
    who: Principal, action: Action, on: Resource, sets: list[GrantSet]
) -> None:
    table = index_grants(s for s in sets if s.principal != who)
    decision = authorize(who, action, on, table)
    assert not decision
    assert decision.reason == f"no grant covers {action} on {on} for {who}"


@given(grant_sets(), actions, resources)
def test_allowed_exactly_when_a_grant_covers_the_path(
    held: GrantSet, action: Action, on: Resource
) -> None:
    path = str(on)  # oracle: path prefix on the string form
    covering = [
        g
        for g in held.grants
        if (path == str(g.scope) or path.startswith(f"{g.scope}/"))
        and action in ROLE_ACTIONS[g.role]
    ]
    decision = authorize(held.principal, action, on, index_grants([held]))
    assert decision.allowed == bool(covering)
    if covering:
        assert any(f"grant {g.role} on {g.scope} allows" in decision.reason for g in covering)


@given(grant_sets(), actions, resources, st.data())
def test_revoking_a_grant_never_adds_and_removes_what_only_it_gave(
    held: GrantSet, action: Action, on: Resource, data: st.DataObject
) -> None:
    if not held.grants:
        return
    grant = data.draw(st.sampled_from(held.grants))
    before = authorize(held.principal, action, on, index_grants([held]))
    after = authorize(held.principal, action, on, index_grants([held.without_grant(grant)]))
    assert before.allowed or not after.allowed
    if not any(g.allows(action, on) for g in held.grants if g != grant):
        assert not after.allowed
    emptied = GrantSet(held.principal)
    assert not authorize(held.principal, action, on, index_grants([emptied]))


@given(principals, roles, resources, st.lists(NAMES, max_size=3), st.data())
def test_a_grant_covers_its_subtree(
    who: Principal, role: Role, scope: Resource, below: list[str], data: st.DataObject
) -> None:
    target = res(*(scope.names + tuple(below))[:4])
    action = data.draw(st.sampled_from(sorted(ROLE_ACTIONS[role])))
    assert authorize(who, action, target, grants_for(who, (role, scope)))


@given(principals, roles, resources.filter(lambda r: len(r.names) > 1), actions, NAMES)
def test_a_grant_never_reaches_up_or_across(
    who: Principal, role: Role, scope: Resource, action: Action, other: str
) -> None:
    table = grants_for(who, (role, scope))
    assert scope.parent is not None
    assert not authorize(who, action, scope.parent, table)
    if other != scope.names[-1]:
        sibling = scope.parent.child(other)
        assert not authorize(who, action, sibling, table)
        assert not authorize(
            who, action, sibling.child("z") if sibling.level < 3 else sibling, table
        )


@given(resources, actions)
def test_unknown_principals_and_misfiled_sets_are_denied(on: Resource, action: Action) -> None:
    table = grants_for(ALICE, (Role.admin, res(on.org)))
    assert not authorize(Principal.user("mallory"), action, on, table)
    assert not authorize(Principal.service("alice"), action, on, table)
    misfiled = {"user:mallory": table["user:alice"]}
    assert not authorize(Principal.user("mallory"), action, on, misfiled)


@given(NAMES, actions, resources)
def test_a_device_touches_only_its_own_device(own: str, action: Action, on: Resource) -> None:
    device = Principal.device(own)
    allowed = authorize(device, action, on, {}).allowed
    assert allowed == (on.device == own and action in DEVICE_ACTIONS)
    with pytest.raises(ValueError, match="grants are for users and services"):
        Grant(device, Role.admin, on)


@given(NAMES, NAMES, st.sampled_from(["telemetry", "events", "state/reported", "#", "+/x"]))
def test_device_topics(own: str, other: str, tail: str) -> None:
    device = Principal.device(own)
    for action in MQTT_ACTIONS:
        wildcard = "#" in tail or "+" in tail
        expect = action is Action.mqtt_subscribe or not wildcard
        assert mqtt_topic_allowed(device, f"devices/{own}/{tail}", action).allowed == expect
        if other != own:
            assert not mqtt_topic_allowed(device, f"devices/{other}/{tail}", action)
    for foreign in ("devices/+/telemetry", "devices/#", "#", f"$share/g/devices/{own}/telemetry"):
        assert not mqtt_topic_allowed(device, foreign, Action.mqtt_subscribe)
    assert not mqtt_topic_allowed(device, f"devices/{own}/a#", Action.mqtt_subscribe)


def test_orchestrator_allowed_all_and_users_have_no_mqtt() -> None:
    orchestrator = Principal.from_mqtt_username("orchestrator")
    assert authorize(orchestrator, Action.grant_write, res("x"), {})
    assert mqtt_topic_allowed(
        orchestrator, "$share/ingest/devices/+/telemetry", Action.mqtt_subscribe
    )
    assert not mqtt_topic_allowed(orchestrator, "devices/+/x", Action.mqtt_publish)
    table = grants_for(ALICE, (Role.admin, res("acme")))
    assert not mqtt_topic_allowed(ALICE, "devices/d-1/telemetry", Action.mqtt_subscribe)
    assert not authorize(ALICE, Action.mqtt_publish, res("acme", "p", "g", "d-1"), table)
    with pytest.raises(ValueError, match="reserved"):
        Principal.from_mqtt_username("broker")


def test_operator_of_project_a_is_denied_on_project_b() -> None:
    table = grants_for(ALICE, (Role.operator, res("acme", "a")))
    assert authorize(ALICE, Action.device_suspend, res("acme", "a", "g", "d-1"), table)
    decision = authorize(ALICE, Action.device_suspend, res("acme", "b", "g", "d-2"), table)
    assert not decision.allowed
    assert decision.reason == (
        "no grant covers device.suspend on org/acme/project/b/group/g/device/d-2 for user:alice"
    )


def test_role_table_examples() -> None:
    group = res("acme", "p", "g")
    table = index_grants(
        [
            GrantSet.of(ALICE, (Role.viewer, res("acme")), (Role.admin, group)),
            GrantSet.of(Principal.user("vic"), (Role.viewer, res("acme"))),
            GrantSet.of(Principal.user("otto"), (Role.ota_approver, group)),
        ]
    )
    vic, otto = Principal.user("vic"), Principal.user("otto")
    assert authorize(vic, Action.telemetry_read, group, table)
    assert not authorize(vic, Action.device_provision, group, table)
    allowed = authorize(ALICE, Action.device_provision, group.child("d-1"), table)
    assert allowed.reason == (
        "grant admin on org/acme/project/p/group/g allows device.provision on "
        "org/acme/project/p/group/g/device/d-1"
    )
    assert not authorize(ALICE, Action.ota_approve, group, table)  # admin: not an approver
    assert authorize(otto, Action.ota_approve, group, table)
    assert not authorize(otto, Action.ota_create, group, table)


@given(resources)
def test_resource_paths_round_trip(resource: Resource) -> None:
    assert Resource.parse(str(resource)) == resource
    assert resource.lineage()[-1] == res(resource.org)
    assert all(r.covers(resource) for r in resource.lineage())


@pytest.mark.parametrize(
    "path",
    ["", "org", "org/", "org/a/group/g", "project/p", "org/a/project/p/x/y", "org/a b", "org/a/"],
)
def test_bad_resource_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"resource|name"):
        Resource.parse(path)


def test_resources_and_principals_are_validated() -> None:
    with pytest.raises(ValueError, match="needs its project"):
        Resource("acme", None, "g")
    with pytest.raises(ValueError, match="reserved"):
        res("acme", "p", "g", "orchestrator")
    for text in ("user:alice", "service:api-1", "device:d-1", "orchestrator"):
        assert str(Principal.parse(text)) == text
    for bad in ("alice", "user:", "user:a/b", "root:x", "device:broker", "orchestrator:x"):
        with pytest.raises(ValueError, match=r"principal|invalid|reserved|orchestrator"):
            Principal.parse(bad)


@given(grant_sets())
def test_grant_sets_round_trip_through_avro(held: GrantSet) -> None:
    codec = AvroCodec(load_schema("GrantSet"), 3)
    decoded = codec.decode(codec.encode(held.to_record()))
    assert isinstance(decoded, Decoded)
    assert GrantSet.from_record(decoded.record) == held
