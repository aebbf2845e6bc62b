"""Devices: list, read, provision, update, suspend, revoke, activate."""

from __future__ import annotations

import asyncio

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from infra.api.models import (
    CommandResult,
    Device,
    DeviceList,
    DeviceUpdate,
    LifecycleRequest,
    Provisioned,
    ProvisionRequest,
)
from infra.api.routes.base import (
    CALLER,
    COMMAND_ERRORS,
    ApiError,
    Handlers,
    Route,
    device_view,
    new_id,
    reply,
)
from infra.pki import PkiError, cert_fingerprint_sha256
from streams.registry.devices import (
    ActivateDevice,
    AuditDecision,
    CommandKind,
    ProvisionDevice,
    RegistryCommand,
    RevokeDevice,
    SuspendDevice,
    UpdateDevice,
)
from streams.registry.rbac import Action, Resource, authorize

__all__ = ["ROUTES", "DeviceRoutes"]


def _csr_common_name(csr_pem: str) -> str:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"cannot parse the CSR: {exc}") from None
    names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1:
        raise ApiError(400, "bad_request", f"the CSR needs exactly one CN, has {names!r}")
    return names[0]


class DeviceRoutes(Handlers):
    """Devices: list, read, provision, update, suspend, revoke, activate."""

    async def list_devices(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        wanted = {
            k: v for k in ("org", "project", "group", "status") if (v := request.query.get(k))
        }
        grants = self.backend.grants()
        visible = [
            device_view(record)
            for record in sorted(self.backend.devices(), key=lambda r: r.device_id)
            if all(str(getattr(record, k)) == v for k, v in wanted.items())
            and authorize(principal, Action.device_read, record.resource, grants).allowed
        ]
        return reply(DeviceList, {"devices": visible})

    async def get_device(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        record = self._known_device(request)
        await self._authorize(
            principal,
            Action.device_read,
            record.resource,
            command="device.get",
            device_id=record.device_id,
        )
        return reply(Device, device_view(record))

    async def provision(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        body = await self._body(request, ProvisionRequest)
        org, project, group, csr_pem = body.org, body.project, body.group, body.csr_pem
        try:
            scope = Resource(org, project, group)
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        action, command = Action.device_provision, "provision"
        # Authorize before anything is signed.
        decision = await self._authorize(principal, action, scope, command=command)
        device_id = body.device_id

        async def refuse(status: int, error: str, reason: str) -> ApiError:
            return await self._refuse(
                principal, status, error, reason, command=command, action=action,
                resource=scope, device_id=device_id, decision=decision,
            )  # fmt: skip

        if device_id is None:
            try:
                device_id = _csr_common_name(csr_pem)
            except ApiError as error:
                raise await refuse(error.status, error.error, error.reason) from None
        try:
            target = scope.child(device_id)
        except ValueError as exc:
            raise await refuse(400, "bad_request", f"invalid device id: {exc}") from None
        existing = self.backend.device(device_id)
        if existing is not None:
            reason = f"device {device_id} already exists ({existing.status})"
            raise await refuse(409, "conflict", reason)
        try:
            cert = await asyncio.to_thread(
                self.backend.issue_certificate, csr_pem.encode(), device_id
            )
        except PkiError as exc:
            raise await refuse(400, "bad_request", str(exc)) from None
        provision = ProvisionDevice(
            command_id=f"provision-{device_id}-{cert.serial_number}",
            principal=principal,
            device_id=device_id,
            org=target.org,
            project=project,
            group=group,
            region=body.region,
            cert_serial=str(cert.serial_number),
            cert_fingerprint=cert_fingerprint_sha256(cert),
            firmware_version=body.firmware_version,
            labels=body.labels,
        )
        try:
            audit = await self._send(provision)
        except ApiError as error:
            # Refused (or unanswered): the certificate must not outlive the refusal.
            await asyncio.to_thread(
                self.backend.revoke_certificate,
                cert.serial_number,
                f"registry did not record the device: {error.reason}",
            )
            raise
        record = await self._settled(device_id, audit)
        return reply(
            Provisioned,
            {
                "device_id": device_id,
                "certificate_pem": cert.public_bytes(Encoding.PEM).decode(),
                "ca_pem": self.backend.ca_pem.decode(),
                "device": None if record is None else device_view(record),
                "audit": audit.to_record(),
            },
            201,
        )

    async def update_device(self, request: web.Request) -> web.Response:
        principal = CALLER.get()
        record = self._known_device(request)
        body = await self._body(request, DeviceUpdate)
        group = body.group
        update = UpdateDevice(
            command_id=new_id("api-update"),
            principal=principal,
            device_id=record.device_id,
            group=group,
            region=body.region,
            firmware_version=body.firmware_version,
            labels=body.labels,
        )
        await self._authorize(
            principal, Action.device_update, record.resource,
            command="update", device_id=record.device_id,
        )  # fmt: skip
        if group is not None and group != record.group:
            try:
                moved = Resource(record.org, record.project, group, record.device_id)
            except ValueError as exc:
                raise ApiError(400, "bad_request", f"invalid group: {exc}") from None
            await self._authorize(
                principal, Action.device_update, moved,
                command="update", device_id=record.device_id,
            )  # fmt: skip
        return await self._command_result(record.device_id, await self._send(update))

    async def _lifecycle(self, request: web.Request, kind: CommandKind) -> web.Response:
        principal = CALLER.get()
        record = self._known_device(request)
        reason = None
        if kind is not CommandKind.activate:  # activate takes no body
            reason = (await self._body(request, LifecycleRequest)).reason
        command_id, device_id = new_id(f"api-{kind}"), record.device_id
        command: RegistryCommand
        if kind is CommandKind.suspend:
            command = SuspendDevice(
                command_id=command_id, principal=principal, device_id=device_id, reason=reason
            )
        elif kind is CommandKind.revoke:
            command = RevokeDevice(
                command_id=command_id, principal=principal, device_id=device_id, reason=reason
            )
        else:
            command = ActivateDevice(
                command_id=command_id, principal=principal, device_id=device_id
            )
        await self._authorize(
            principal, command.action, record.resource,
            command=str(kind), device_id=record.device_id,
        )  # fmt: skip
        audit = await self._send(command)
        if isinstance(command, RevokeDevice) and audit.decision is AuditDecision.applied:
            await asyncio.to_thread(
                self.backend.revoke_certificate,
                int(record.cert_serial),
                f"device revoked by {principal}" + (f": {reason}" if reason else ""),
            )
        return await self._command_result(record.device_id, audit)

    async def suspend_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.suspend)

    async def revoke_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.revoke)

    async def activate_device(self, request: web.Request) -> web.Response:
        return await self._lifecycle(request, CommandKind.activate)


ROUTES: tuple[Route, ...] = (
    Route(
        "GET", "/v1/devices", "list_devices", "The devices the caller may read",
        Action.device_read, result=DeviceList, errors=(400,),
        query=("org", "project", "group", "status"),
    ),
    Route(
        "POST", "/v1/devices", "provision",
        "Provision a device: authorize, sign its CSR, record it through the registry agent",
        Action.device_provision, body=ProvisionRequest, ok=201, result=Provisioned,
        errors=(400, 409, 503, 504),
    ),
    Route(
        "GET", "/v1/devices/{device_id}", "get_device", "One device's registry entry",
        Action.device_read, result=Device, errors=(404,),
    ),
    Route(
        "PATCH", "/v1/devices/{device_id}", "update_device",
        "Change a device's group, region, firmware version or labels",
        Action.device_update, body=DeviceUpdate, result=CommandResult, errors=COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/suspend", "suspend_device", "Suspend a device",
        Action.device_suspend, body=LifecycleRequest, body_required=False,
        result=CommandResult, errors=COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/revoke", "revoke_device",
        "Revoke a device for good (its certificate too)",
        Action.device_revoke, body=LifecycleRequest, body_required=False,
        result=CommandResult, errors=COMMAND_ERRORS,
    ),
    Route(
        "POST", "/v1/devices/{device_id}/activate", "activate_device",
        "Activate a provisioned or suspended device",
        Action.device_activate, result=CommandResult, errors=COMMAND_ERRORS,
    ),
)  # fmt: skip
