"""The HTTP API's request and response bodies, as pydantic models: defined once, used both to
validate what a handler receives (:func:`parse_body`) and to build the OpenAPI document's
``components/schemas`` (:func:`component_schemas`), so the document and the validation cannot
drift apart.

Request bodies are strict: JSON types as written (no ``"1"`` for 1), no unknown fields, finite
numbers, names matching the platform's patterns. Checks that need state (is the CSR parseable,
does the device exist, may the caller...) stay in the handlers and are documented as 4xx.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    RootModel,
    StrictBool,
    StrictInt,
    field_validator,
)

from schemas.identity import DEVICE_ID_PATTERN
from streams.alerts import RuleKind, ScopeType, Severity
from streams.registry.devices import AuditDecision, DeviceStatus
from streams.registry.rbac import PRINCIPAL_ID_PATTERN, SEGMENT_PATTERN, Role

__all__ = [
    "MAX_JSON_DEPTH",
    "MODELS",
    "BodyError",
    "component_schemas",
    "json_depth_exceeds",
    "parse_body",
]

# Nesting levels a request body may have: far above any valid body (a twin document has 6), far
# below what makes a recursive decoder or encoder fail.
MAX_JSON_DEPTH = 32
_SCHEMA_REF = "#/components/schemas/{model}"


def _anchored(pattern: str) -> str:
    return f"^{pattern}$"


Text = Annotated[str, Field(min_length=1)]
Name = Annotated[str, Field(pattern=_anchored(SEGMENT_PATTERN.pattern))]
DeviceId = Annotated[str, Field(pattern=_anchored(DEVICE_ID_PATTERN.pattern))]
_NAME = SEGMENT_PATTERN.pattern
ScopePath = Annotated[
    str,
    Field(
        pattern=_anchored(f"org/{_NAME}(/project/{_NAME}(/group/{_NAME}(/device/{_NAME})?)?)?"),
        examples=["org/acme/project/plant-1"],
    ),
]
GroupPath = Annotated[
    str,
    Field(
        pattern=_anchored(f"org/{_NAME}/project/{_NAME}/group/{_NAME}"),
        examples=["org/acme/project/p/group/g"],
    ),
]
Labels = dict[Annotated[str, Field(min_length=1)], str]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Percent = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
# The principal path parameter, documented with the pattern Principal.parse accepts.
PRINCIPAL_PATTERN = _anchored(f"(user|service):{PRINCIPAL_ID_PATTERN.pattern}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


M = TypeVar("M", bound=BaseModel)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- requests


class ProvisionRequest(_Request):
    org: Name
    project: Name
    group: Name
    csr_pem: Text = Field(description="PEM CSR; its CN is the device id unless device_id is set.")
    device_id: DeviceId | None = Field(default=None, description="Default: the CSR's CN.")
    region: Text = "local"
    firmware_version: Text | None = None
    labels: Labels = Field(default_factory=dict)


class DeviceUpdate(_Request):
    group: Name | None = None
    region: Text | None = None
    firmware_version: Text | None = None
    labels: Labels | None = None


class LifecycleRequest(_Request):
    reason: Text | None = None


class TwinPatch(_Request):
    desired: dict[Text, JsonValue] = Field(
        description="Merge patch; null removes a key. The twin agent refuses (400) a document "
        "nested deeper than 6 levels or over 8 KiB."
    )
    version: StrictInt | None = Field(default=None, description="Expected version.")


class GrantBody(_Request):
    role: Role
    scope: ScopePath


class GrantsPut(_Request):
    grants: list[GrantBody]


class _RuleBody(_Request):
    """What every alert rule has; the variants below say what its kind and scope need."""

    rule_id: Text | None = Field(default=None, description="If given, the path's rule id.")
    threshold: Finite = 0.0
    clear_threshold: Finite | None = Field(
        default=None,
        description="Where a raised alert clears (default: the threshold); above: <= threshold, "
        "below: >= threshold, rate_of_change: between 0 and the threshold.",
    )
    window_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    severity: Severity = Severity.warning


class _GroupScope(BaseModel):
    scope_type: Literal["group"]
    scope: GroupPath


class _DeviceScope(BaseModel):
    scope_type: Literal["device"]
    scope: DeviceId = Field(description="A registered device's id.")


class _ThresholdKind(BaseModel):
    kind: Literal["above", "below", "rate_of_change"]
    metric: Text
    heartbeat_s: Finite | None = None


class _HeartbeatKind(BaseModel):
    kind: Literal["missing_heartbeat"]
    metric: str = ""
    heartbeat_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class GroupThresholdRule(_RuleBody, _GroupScope, _ThresholdKind):
    pass


class GroupHeartbeatRule(_RuleBody, _GroupScope, _HeartbeatKind):
    pass


class DeviceThresholdRule(_RuleBody, _DeviceScope, _ThresholdKind):
    pass


class DeviceHeartbeatRule(_RuleBody, _DeviceScope, _HeartbeatKind):
    pass


_GroupRule = Annotated[GroupThresholdRule | GroupHeartbeatRule, Field(discriminator="kind")]
_DeviceRule = Annotated[DeviceThresholdRule | DeviceHeartbeatRule, Field(discriminator="kind")]


class AlertRuleBody(RootModel[_GroupRule | _DeviceRule]):
    """An alert rule: on a group (its path) or a device (its id); a threshold kind names its
    metric, a missing_heartbeat rule its heartbeat_s."""

    model_config = ConfigDict(strict=True, frozen=True)


class RolloutPlanBody(_Request):
    """Cohorts and gates (default: a canary of 5, then 1%, 10%, 100%; success 0.95; error
    0.05; health window 300 s)."""

    canary_size: Annotated[StrictInt, Field(ge=1)] = 5
    percentages: Annotated[
        list[Percent],
        Field(min_length=1, json_schema_extra={"uniqueItems": True, "contains": {"const": 100}}),
    ] = Field(
        default_factory=lambda: [1.0, 10.0, 100.0],
        description="Cumulative shares, strictly ascending, the last one 100.",
    )
    success_threshold: Fraction = 0.95
    error_threshold: Fraction = 0.05
    health_window_s: Seconds = 300.0
    alert_severities: list[Severity] = Field(default_factory=lambda: [Severity.critical])
    require_telemetry: StrictBool = True
    cohort_timeout_s: Seconds | None = None
    rollback_timeout_s: Seconds = 900.0

    @field_validator("percentages")
    @classmethod
    def _unique_with_100(cls, shares: list[float]) -> list[float]:
        """What the schema says (uniqueItems, contains 100); the order is RolloutPlan's."""
        if len(set(shares)) != len(shares) or 100 not in shares:
            raise ValueError("percentages must be distinct and include 100")
        return shares


class RolloutCreate(_Request):
    artifact_id: Text = Field(description="The artifact's sha256.")
    target: ScopePath
    rollout_id: Text | None = Field(default=None, description="Default: generated.")
    plan: RolloutPlanBody | None = None
    comment: Text | None = None


class RolloutControl(_Request):
    comment: Text | None = None


# --------------------------------------------------------------------------- responses


class Error(_Response):
    model_config = ConfigDict(extra="allow")  # a refused twin patch adds its answer's fields
    error: str = Field(examples=["unauthorized", "forbidden", "bad_request", "not_found"])
    reason: str
    command_id: str | None = Field(default=None, description="Its audit record's id.")
    audit: AuditRecord | None = None


class AuditRecord(_Response):
    """One decision, as written to audit.log."""

    ts_ms: int
    command_id: str
    command: str
    principal: str
    action: str
    device_id: str | None
    resource: str | None
    decision: AuditDecision
    authorization: str
    reason: str


class Health(_Response):
    status: Literal["ok", "starting"]
    ready: bool


class Device(_Response):
    device_id: str
    org: str
    project: str
    group: str
    region: str
    status: DeviceStatus
    cert_serial: str
    cert_fingerprint: str
    firmware_version: str | None
    labels: dict[str, str]
    created_ms: int
    updated_ms: int
    last_command_id: str | None
    resource: str = Field(examples=["org/acme/project/p/group/g/device/d"])


class DeviceList(_Response):
    devices: list[Device]


class Provisioned(_Response):
    device_id: str
    certificate_pem: str
    ca_pem: str
    device: Device | None
    audit: AuditRecord


class CommandResult(_Response):
    device: Device | None
    audit: AuditRecord


class Twin(_Response):
    desired: dict[str, JsonValue]
    reported: dict[str, JsonValue]
    delta: dict[str, JsonValue]
    version: int


class TwinAnswer(_Response):
    status: Literal["accepted", "unchanged", "conflict", "invalid"]
    version: int
    detail: str | None
    twin: Twin
    audit: AuditRecord


class Grant(_Response):
    role: Role
    scope: str = Field(examples=["org/acme/project/plant-1"])


class GrantSet(_Response):
    principal: str
    grants: list[Grant]


class GrantsResult(GrantSet):
    audit: AuditRecord


class AlertRule(_Response):
    rule_id: str
    scope_type: ScopeType
    scope: str
    metric: str
    kind: RuleKind
    threshold: float
    clear_threshold: float | None
    window_s: float | None
    heartbeat_s: float | None
    severity: Severity
    resource: str


class RuleList(_Response):
    rules: list[AlertRule]


class RuleResult(_Response):
    rule_id: str
    rule: AlertRule | None
    audit: AuditRecord


class Rollout(_Response):
    rollout_id: str
    state: str
    version: str
    target: str
    cohort: int
    cohorts: list[int]
    updated: int
    failed: int
    rolled_back: int
    refused: int
    progress: dict[str, int]
    reason: str | None


class RolloutList(_Response):
    rollouts: list[Rollout]


class RolloutResult(_Response):
    rollout_id: str
    rollout: Rollout | None
    audit: AuditRecord


MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        Error, AuditRecord, Health, Device, DeviceList, ProvisionRequest, Provisioned,
        DeviceUpdate, LifecycleRequest, CommandResult, Twin, TwinPatch, TwinAnswer, Grant,
        GrantSet, GrantBody, GrantsPut, GrantsResult, AlertRuleBody, GroupThresholdRule,
        GroupHeartbeatRule, DeviceThresholdRule, DeviceHeartbeatRule, AlertRule, RuleList,
        RuleResult, RolloutPlanBody, RolloutCreate, RolloutControl, Rollout, RolloutList,
        RolloutResult,
    )
}  # fmt: skip


def component_schemas() -> dict[str, Any]:
    """Every model's JSON schema, keyed by name, referring to each other by
    ``#/components/schemas/<name>`` (what the OpenAPI document's components hold)."""
    schemas: dict[str, Any] = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(ref_template=_SCHEMA_REF)
        for nested, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(nested, definition)
        schemas[name] = schema
    return schemas


# --------------------------------------------------------------------------- parsing


class BodyError(ValueError):
    """A request body that is not acceptable; the message says why (a 400)."""


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``text`` opens more than ``limit`` arrays/objects inside each other.

    One linear pass before any decoding, so a hostile body never reaches a recursive parser;
    brackets inside strings are not counted."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _error_text(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def parse_body(raw: bytes, model: type[M], *, required: bool = True) -> M:
    """``raw`` as a ``model``: strict UTF-8, bounded nesting, then the model's validation."""
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        if required:
            raise BodyError("a JSON object body is required")
        return model()
    if json_depth_exceeds(text):
        raise BodyError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return model.model_validate_json(text)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise BodyError(_error_text(exc)) from None
