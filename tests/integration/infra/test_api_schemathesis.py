"""schemathesis, run against the real API's own /openapi.json with an organization admin's
token: no server error, every answer conforms to the document (status codes, content types,
response schemas), schema-invalid data is refused, and no operation rejects most of the data
its documented schema allows (the `validation_mismatch` warning fails the run).

The run is bounded (a few examples per operation, a fixed seed, no stateful phase) so it takes
a couple of minutes at most on a loaded machine; pytest-timeout is the backstop.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.api.client import HotPathClient
from infra.keys import token_authority
from infra.services.base import wait_until
from infra.settings import PROJECT_ROOT, Settings
from infra.stack import Stack
from streams.registry.rbac import GrantSet, Principal, Resource, Role
from tests.integration.infra.test_api import Http

pytestmark = pytest.mark.integration

SCHEMATHESIS = str(PROJECT_ROOT / ".venv" / "bin" / "schemathesis")
MAX_EXAMPLES = 5
RUN_BUDGET_S = 480  # the subprocess's own timeout; measured well under it
CONFIG = """\
[warnings]
fail-on = ["validation_mismatch"]
"""


@pytest.fixture(scope="module")
def admin_token(stack: Stack, settings: Settings) -> str:
    """An admin of a new organization (the grant written as the platform, as `fleet grant`
    does), once the API has it."""
    admin = Principal.user(f"st-admin-{uuid.uuid4().hex[:8]}")
    client = HotPathClient(settings)
    try:
        client.put_grants(GrantSet.of(admin, (Role.admin, Resource(f"st-{uuid.uuid4().hex[:8]}"))))
    finally:
        client.close()
    token = token_authority(settings).issue(admin, ttl_s=3600)
    http = Http(f"http://{settings.host}:{settings.api_port}")

    def seen() -> bool:
        own = http("GET", f"/v1/grants/{admin}", token)
        return own.status == 200 and len(own.body["grants"]) == 1

    assert wait_until(seen, timeout=60, interval=0.2), "the API never saw the admin's grant"
    return token


@pytest.mark.timeout(RUN_BUDGET_S + 60)
def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    settings: Settings, admin_token: str, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    base = f"http://{settings.host}:{settings.api_port}"
    command = [
        SCHEMATHESIS, "--config-file", str(config), "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {admin_token}",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "20261202", "--workers", "1",
        "--request-timeout", "60", "--suppress-health-check", "too_slow,filter_too_much",
        "--no-color",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_BUDGET_S, cwd=tmp_path
    )
    elapsed = time.monotonic() - started
    summary = result.stdout[result.stdout.rfind("SUMMARY") :]
    sys.stdout.write(f"\nschemathesis: {elapsed:.0f}s\n{summary}\n")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "Server error" not in result.stdout
    assert "Schema validation mismatch" not in result.stdout
