"""RBAC: the one authority model behind the broker ACL, the API and the stream agents.

Resources form a hierarchy Organization -> Project -> device group -> device, written as a path
``org/acme/project/plant-1/group/sensors/device/d-1`` (:class:`Resource`). A :class:`Grant`
gives a user or service principal a :class:`Role` on one scope; it covers that scope and
everything beneath it, never its parent or a sibling. Grants live per principal in a
:class:`GrantSet` (topic ``rbac.grants``, key = the principal's :attr:`Principal.key`).

:func:`authorize` is the single decision every layer asks: deny by default; the orchestrator
may do everything; a device principal may only publish/subscribe (and read its twin) on its
own device, whatever grants exist; users and services need a grant whose role allows the
action on a scope covering the resource. :func:`mqtt_topic_allowed` applies the same model to
MQTT topics (``devices/<own id>/#`` for a device, every topic for the orchestrator).

MQTT actions belong to devices and the orchestrator only: users and services reach a device
through the API (``twin.write``, ``ota.control``), whose effects the orchestrator relays. A
device's registry status (suspended, revoked) is not part of this model: the registry and the
broker's ACL/CRL generation exclude such devices before asking.

``ota.approve`` is held by the ``ota-approver`` role alone, not by ``admin``: an admin who
wants to approve a rollout grants itself the role first, and that grant is audited.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any

from schemas.identity import DEVICE_ID_PATTERN, RESERVED_IDENTITIES

__all__ = [
    "DEVICE_ACTIONS",
    "GRANT_SET_SCHEMA",
    "MQTT_ACTIONS",
    "ORCHESTRATOR_ID",
    "PRINCIPAL_ID_PATTERN",
    "ROLE_ACTIONS",
    "SEGMENT_PATTERN",
    "Action",
    "Decision",
    "Grant",
    "GrantSet",
    "Level",
    "Principal",
    "PrincipalKind",
    "Resource",
    "Role",
    "authorize",
    "index_grants",
    "mqtt_topic_allowed",
]

GRANT_SET_SCHEMA = "GrantSet"  # schemas/avro/GrantSet.avsc
# Organization, project and group names follow the device id rule: safe in paths and topics.
SEGMENT_PATTERN = DEVICE_ID_PATTERN
# User and service ids (e-mail addresses included); never ':' or '/', never whitespace.
PRINCIPAL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
ORCHESTRATOR_ID = "orchestrator"
_MAX_TOPIC_BYTES = 65535


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    ota_approver = "ota-approver"


class PrincipalKind(StrEnum):
    user = "user"
    service = "service"
    device = "device"
    orchestrator = "orchestrator"


class Action(StrEnum):
    device_read = "device.read"
    device_provision = "device.provision"
    device_update = "device.update"
    device_activate = "device.activate"
    device_suspend = "device.suspend"
    device_revoke = "device.revoke"
    grant_read = "grant.read"
    grant_write = "grant.write"
    twin_read = "twin.read"
    twin_write = "twin.write"
    ota_create = "ota.create"
    ota_approve = "ota.approve"
    ota_control = "ota.control"
    ota_read = "ota.read"
    alert_read = "alert.read"
    alert_write = "alert.write"
    telemetry_read = "telemetry.read"
    mqtt_publish = "mqtt.publish"
    mqtt_subscribe = "mqtt.subscribe"


MQTT_ACTIONS = frozenset({Action.mqtt_publish, Action.mqtt_subscribe})
# What a device principal may do, and only on its own device.
DEVICE_ACTIONS = MQTT_ACTIONS | {Action.twin_read}

_READS = frozenset(
    {
        Action.device_read,
        Action.grant_read,
        Action.twin_read,
        Action.telemetry_read,
        Action.ota_read,
        Action.alert_read,
    }
)
_OPERATES = _READS | {
    Action.twin_write,
    Action.device_update,
    Action.device_activate,
    Action.device_suspend,
    Action.ota_create,
    Action.ota_control,
    Action.alert_write,
}
ROLE_ACTIONS: Mapping[Role, frozenset[Action]] = MappingProxyType(
    {
        Role.viewer: _READS,
        Role.operator: _OPERATES,
        Role.admin: frozenset(Action) - MQTT_ACTIONS - {Action.ota_approve},
        Role.ota_approver: _READS | {Action.ota_approve},
    }
)
_ROLE_ORDER = {role: i for i, role in enumerate(Role)}


# --------------------------------------------------------------------------- resources


class Level(IntEnum):
    org = 0
    project = 1
    group = 2
    device = 3


_KEYS = tuple(level.name for level in Level)  # path keys: org, project, group, device


@dataclass(frozen=True, slots=True)
class Resource:
    """A node of the hierarchy; the fields below the deepest one given are None."""

    org: str
    project: str | None = None
    group: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        parts = (self.org, self.project, self.group, self.device)
        depth = len(self.names)
        if depth == 0:
            raise ValueError("a resource needs at least its organization")
        if any(part is not None for part in parts[depth:]):
            missing = _KEYS[depth]
            raise ValueError(f"a resource naming a {_KEYS[depth + 1]} needs its {missing}")
        for key, name in zip(_KEYS, self.names, strict=False):
            if not isinstance(name, str) or SEGMENT_PATTERN.fullmatch(name) is None:
                raise ValueError(
                    f"invalid {key} name {name!r}: must match {SEGMENT_PATTERN.pattern}"
                )
        if self.device is not None and self.device.lower() in RESERVED_IDENTITIES:
            raise ValueError(f"{self.device!r} is reserved for the platform, not a device")

    @property
    def names(self) -> tuple[str, ...]:
        """The names from the organization down, e.g. ``("acme", "plant-1")``."""
        names: list[str] = []
        for part in (self.org, self.project, self.group, self.device):
            if part is None:
                break
            names.append(part)
        return tuple(names)

    @property
    def level(self) -> Level:
        return Level(len(self.names) - 1)

    @property
    def parent(self) -> Resource | None:
        """The resource one level up; None for an organization."""
        names = self.names
        return None if len(names) == 1 else _from_names(names[:-1])

    def lineage(self) -> tuple[Resource, ...]:
        """This resource and every one above it, itself first, its organization last."""
        names = self.names
        return tuple(_from_names(names[:n]) for n in range(len(names), 0, -1))

    def child(self, name: str) -> Resource:
        """The resource ``name`` one level below (project of an org, group of a project, ...)."""
        if self.level is Level.device:
            raise ValueError(f"{self} is a device: nothing lies beneath it")
        return _from_names((*self.names, name))

    def covers(self, other: Resource) -> bool:
        """True when ``other`` is this resource or lies beneath it."""
        names = self.names
        return other.names[: len(names)] == names

    @classmethod
    def parse(cls, text: str) -> Resource:
        """The resource of a path such as ``org/acme/project/plant-1``."""
        if not isinstance(text, str):
            raise ValueError(f"a resource path must be a string, got {type(text).__name__}")
        parts = text.split("/")
        keys, names = parts[0::2], parts[1::2]
        if len(parts) % 2 or not names or tuple(keys) != _KEYS[: len(keys)]:
            raise ValueError(f"invalid resource path {text!r}: expected org/<o>[/project/<p>...]")
        return _from_names(names)

    def __str__(self) -> str:
        return "/".join(f"{key}/{name}" for key, name in zip(_KEYS, self.names, strict=False))


def _from_names(names: Sequence[str]) -> Resource:
    if not 1 <= len(names) <= len(_KEYS):
        raise ValueError(f"a resource has 1 to {len(_KEYS)} names, got {len(names)}")
    return Resource(**dict(zip(_KEYS, names, strict=False)))


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True, slots=True)
class Principal:
    """Who acts. ``str()`` is its key in ``rbac.grants``: ``user:alice``, ``device:d-1``,
    ``orchestrator``."""

    kind: PrincipalKind
    id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PrincipalKind(self.kind))
        ident = self.id
        if not isinstance(ident, str):
            raise ValueError(f"a principal id must be a string, got {type(ident).__name__}")
        if self.kind is PrincipalKind.orchestrator:
            if ident != ORCHESTRATOR_ID:
                raise ValueError(f"the orchestrator principal's id is {ORCHESTRATOR_ID!r}")
        elif self.kind is PrincipalKind.device:
            if DEVICE_ID_PATTERN.fullmatch(ident) is None:
                raise ValueError(f"invalid device principal id {ident!r}")
            if ident.lower() in RESERVED_IDENTITIES:
                raise ValueError(f"{ident!r} is reserved for the platform, not a device")
        elif PRINCIPAL_ID_PATTERN.fullmatch(ident) is None:
            raise ValueError(f"invalid {self.kind} id {ident!r}")

    @classmethod
    def user(cls, ident: str) -> Principal:
        return cls(PrincipalKind.user, ident)

    @classmethod
    def service(cls, ident: str) -> Principal:
        return cls(PrincipalKind.service, ident)

    @classmethod
    def device(cls, ident: str) -> Principal:
        return cls(PrincipalKind.device, ident)

    @classmethod
    def orchestrator(cls) -> Principal:
        return cls(PrincipalKind.orchestrator, ORCHESTRATOR_ID)

    @classmethod
    def parse(cls, text: str) -> Principal:
        """The principal of ``kind:id`` (or ``orchestrator``)."""
        if text == ORCHESTRATOR_ID:
            return cls.orchestrator()
        kind, sep, ident = text.partition(":")
        if not sep or kind not in PrincipalKind.__members__:
            raise ValueError(f"invalid principal {text!r}: expected user:<id>, service:<id>, ...")
        if kind == PrincipalKind.orchestrator:
            raise ValueError(f"the orchestrator principal is written {ORCHESTRATOR_ID!r}")
        return cls(PrincipalKind(kind), ident)

    @classmethod
    def from_mqtt_username(cls, username: str) -> Principal:
        """The principal behind an MQTT username (= certificate CN): a device or the
        orchestrator. Raises ValueError for other platform names and unsafe ids."""
        if username == ORCHESTRATOR_ID:
            return cls.orchestrator()
        return cls.device(username)

    @property
    def key(self) -> str:
        """The principal's key in ``rbac.grants`` and its name in audit records."""
        return str(self)

    def __str__(self) -> str:
        if self.kind is PrincipalKind.orchestrator:
            return ORCHESTRATOR_ID
        return f"{self.kind}:{self.id}"


_GRANTEES = frozenset({PrincipalKind.user, PrincipalKind.service})


def _check_grantee(principal: Principal) -> None:
    if principal.kind not in _GRANTEES:
        raise ValueError(f"grants are for users and services, not {principal.kind} principals")


# --------------------------------------------------------------------------- grants


@dataclass(frozen=True, slots=True)
class Grant:
    principal: Principal
    role: Role
    scope: Resource

    def __post_init__(self) -> None:
        _check_grantee(self.principal)
        object.__setattr__(self, "role", Role(self.role))

    def allows(self, action: Action, resource: Resource) -> bool:
        return action in ROLE_ACTIONS[self.role] and self.scope.covers(resource)

    def __str__(self) -> str:
        return f"{self.role} on {self.scope} to {self.principal}"


def _grant_order(grant: Grant) -> tuple[tuple[str, ...], int]:
    return grant.scope.names, _ROLE_ORDER[grant.role]


@dataclass(frozen=True, slots=True)
class GrantSet:
    """Every grant one principal holds: the value of ``rbac.grants`` under its key.

    Grants are kept deduplicated and sorted, so equal sets compare (and encode) equal.
    """

    principal: Principal
    grants: tuple[Grant, ...] = ()

    def __post_init__(self) -> None:
        _check_grantee(self.principal)
        grants = tuple(self.grants)
        for grant in grants:
            if grant.principal != self.principal:
                raise ValueError(f"grant {grant} does not belong to {self.principal}'s set")
        object.__setattr__(self, "grants", tuple(sorted(set(grants), key=_grant_order)))

    @classmethod
    def of(cls, principal: Principal, *roles: tuple[Role, Resource]) -> GrantSet:
        """``GrantSet.of(p, (Role.admin, Resource("acme")), ...)``."""
        return cls(principal, tuple(Grant(principal, role, scope) for role, scope in roles))

    def with_grant(self, grant: Grant) -> GrantSet:
        return GrantSet(self.principal, (*self.grants, grant))

    def without_grant(self, grant: Grant) -> GrantSet:
        return GrantSet(self.principal, tuple(g for g in self.grants if g != grant))

    def covering(self, action: Action, resource: Resource) -> Grant | None:
        """The grant that allows ``action`` on ``resource``, if any: the one with the deepest
        scope, and among those the least powerful role."""
        allowing = [grant for grant in self.grants if grant.allows(action, resource)]
        if not allowing:
            return None
        return max(allowing, key=lambda g: (len(g.scope.names), -_ROLE_ORDER[g.role]))

    def to_record(self) -> dict[str, Any]:
        """The Avro ``GrantSet`` record."""
        return {
            "principal": str(self.principal),
            "grants": [{"role": str(g.role), "scope": str(g.scope)} for g in self.grants],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GrantSet:
        """Inverse of :meth:`to_record`; raises ValueError for what is not a valid grant set."""
        principal = Principal.parse(record["principal"])
        grants = tuple(
            Grant(principal, Role(item["role"]), Resource.parse(item["scope"]))
            for item in record["grants"]
        )
        return cls(principal, grants)


def index_grants(sets: Iterable[GrantSet]) -> dict[str, GrantSet]:
    """The ``rbac.grants`` table shape: each set under its principal's key (last one wins)."""
    return {str(grant_set.principal): grant_set for grant_set in sets}


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """An authorization decision; ``reason`` names the grant that allowed it, or why not.

    Truthy exactly when allowed, so ``if authorize(...)`` reads as expected.
    """

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def authorize(
    principal: Principal,
    action: Action,
    resource: Resource,
    grants: Mapping[str, GrantSet],
) -> Decision:
    """May ``principal`` do ``action`` on ``resource``, given the ``rbac.grants`` table?

    Pure and deny-by-default: the orchestrator is allowed everything; a device principal only
    :data:`DEVICE_ACTIONS` on its own device (grants never apply to devices); a user or service
    needs a grant whose role allows ``action`` on ``resource`` or on a resource above it.
    """
    subject = f"{action} on {resource}"
    if principal.kind is PrincipalKind.orchestrator:
        return Decision(True, f"the orchestrator is allowed {subject}")
    if principal.kind is PrincipalKind.device:
        if action not in DEVICE_ACTIONS:
            return Decision(
                False,
                f"device {principal.id} may not {subject}: devices may only "
                f"{', '.join(sorted(DEVICE_ACTIONS))} on their own device",
            )
        if resource.device != principal.id:
            return Decision(False, f"device {principal.id} may not {subject}: not its own device")
        return Decision(True, f"device {principal.id} may {subject}: its own device")
    held = grants.get(principal.key)
    if held is not None and held.principal == principal:
        grant = held.covering(action, resource)
        if grant is not None:
            return Decision(True, f"grant {grant.role} on {grant.scope} allows {subject}")
    return Decision(False, f"no grant covers {subject} for {principal}")


def _topic_problem(topic: str, action: Action) -> str | None:
    """Why ``topic`` is not a valid MQTT topic name (publish) or filter (subscribe), if so."""
    if not isinstance(topic, str) or not topic:
        return "empty topic"
    if "\x00" in topic or len(topic.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        return "invalid topic"
    levels = topic.split("/")
    if action is Action.mqtt_publish:
        if "+" in topic or "#" in topic:
            return "wildcards are not allowed in a published topic"
        return None
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            return "misplaced wildcard in topic filter"
    return None


def mqtt_topic_allowed(principal: Principal, topic: str, action: Action) -> Decision:
    """May ``principal`` publish to / subscribe to ``topic`` (a topic filter for subscribe)?

    The orchestrator may use every valid topic (``$share/...`` included); a device only topics
    and filters inside ``devices/<own id>/#``; users and services have no MQTT access.
    """
    if action not in MQTT_ACTIONS:
        return Decision(False, f"{action} is not an MQTT action")
    problem = _topic_problem(topic, action)
    if problem is not None:
        return Decision(False, f"{action} on {topic!r} refused: {problem}")
    if principal.kind is PrincipalKind.orchestrator:
        return Decision(True, f"the orchestrator is allowed {action} on {topic!r}")
    if principal.kind is not PrincipalKind.device:
        return Decision(False, f"{principal} has no MQTT access: only devices and the orchestrator")
    if topic.split("/")[:2] == ["devices", principal.id]:
        return Decision(True, f"device {principal.id} may {action} on {topic!r}: its own topics")
    return Decision(
        False,
        f"device {principal.id} may not {action} on {topic!r}: outside devices/{principal.id}/#",
    )
