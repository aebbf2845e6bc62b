"""Apache Doris Stream Load, with two-phase commit: request building and response handling.

The documented contract (Doris 2.1/3.0 "Stream Load" and "Transaction" manuals):

* ``PUT http://<fe>:<http_port>/api/<db>/<table>/_stream_load`` with HTTP basic auth and the
  load's options as headers (``label``, ``format``, ``two_phase_commit``, ``columns``, ...).
  The FE answers ``307 Temporary Redirect`` to a BE; the client sends the same request there,
  credentials included (``curl --location-trusted``). requests drops the Authorization header
  when a redirect goes to another host, so redirects are followed here, by hand.
* The JSON body's ``Status`` decides, not the HTTP code (a failed load is HTTP 200):
  ``Success``; ``Publish Timeout`` (committed, visible a little later: loaded); ``Label Already
  Exists`` (a load with this label was done before: ``ExistingJobStatus`` ``FINISHED`` means
  committed, ``RUNNING`` means prepared or pre-committed, still to commit); ``Fail`` (with
  ``Message`` and, for rejected rows, ``ErrorURL``).
* With ``two_phase_commit: true`` a successful load is only PRECOMMITTED (``TxnId`` given, rows
  invisible) until ``PUT /api/<db>/_stream_load_2pc`` with ``txn_id`` (or ``label``) and
  ``txn_operation: commit``; that answer is ``{"status": "Success", "msg": ...}``.

Everything here is pure but for :class:`StreamLoader`, which takes a ``requests.Session``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final
from urllib.parse import urljoin

import requests

from sinks.base import InvalidBatch, SinkUnavailable

__all__ = [
    "LoadOutcome",
    "LoadRequest",
    "LoadResult",
    "StreamLoader",
    "classify_commit",
    "classify_load",
    "load_headers",
]

REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
MAX_HOPS: Final = 4


class LoadOutcome(Enum):
    PRECOMMITTED = "precommitted"  # loaded, invisible until its transaction is committed
    COMMITTED = "committed"  # visible (or about to be: Publish Timeout)
    ALREADY_LOADED = "already_loaded"  # the label was committed before: a re-sent batch
    TO_COMMIT = "to_commit"  # the label's earlier load is prepared/pre-committed: commit it


@dataclass(frozen=True, slots=True)
class LoadResult:
    outcome: LoadOutcome
    label: str
    txn_id: int | None
    rows: int
    body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One Stream Load: where, what, and under which label."""

    base_url: str  # http://fe:http_port
    database: str
    table: str
    label: str
    body: bytes
    fmt: str  # "json" (one object per line) or "arrow" (an Arrow IPC stream)
    columns: tuple[str, ...]
    timeout_s: float = 120.0

    @property
    def url(self) -> str:
        return f"{self.base_url}/api/{self.database}/{self.table}/_stream_load"

    def commit_url(self) -> str:
        return f"{self.base_url}/api/{self.database}/_stream_load_2pc"


def load_headers(request: LoadRequest) -> dict[str, str]:
    """The Stream Load headers of ``request``: its label, format, columns, two-phase commit,
    UTC times, and no row filtered silently (``max_filter_ratio`` 0: one bad row fails the
    load, and the batch is dead-lettered whole, with the reason)."""
    headers = {
        "Expect": "100-continue",
        "label": request.label,
        "format": request.fmt,
        "columns": ",".join(f"`{c}`" for c in request.columns),
        "two_phase_commit": "true",
        "timezone": "UTC",
        "max_filter_ratio": "0",
        "strict_mode": "true",
        "timeout": str(max(1, int(request.timeout_s))),
        "Content-Type": "application/octet-stream",
    }
    if request.fmt == "json":
        headers["read_json_by_line"] = "true"
    return headers


def _body(response: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise SinkUnavailable(
            f"{what}: HTTP {response.status_code}, not a JSON answer: {response.text[:200]!r}"
        ) from exc
    if not isinstance(body, dict):
        raise SinkUnavailable(f"{what}: HTTP {response.status_code}, answer {body!r}")
    return body


# Words of a failed load's message that say the rows are at fault (retrying cannot help).
_DATA_ERRORS: Final = (
    "DATA_QUALITY_ERROR",
    "too many filtered rows",
    "Parse json data",
    "parse arrow",
    "column count",
    "Unknown column",
    "is not in the table",
    "INVALID_ARGUMENT",
)


def classify_load(body: Mapping[str, Any], label: str) -> LoadResult:
    """A Stream Load answer as a :class:`LoadResult`; raises :class:`InvalidBatch` when the
    rows are refused (retrying cannot help) and :class:`SinkUnavailable` for anything else that
    failed (retry the same batch under the same label)."""
    status = str(body.get("Status", ""))
    txn = body.get("TxnId")
    txn_id = int(txn) if isinstance(txn, int | str) and str(txn).isdigit() else None
    rows = int(body.get("NumberLoadedRows", 0) or 0)
    message = str(body.get("Message", "") or body.get("msg", ""))
    if status == "Success":
        two_phase = str(body.get("TwoPhaseCommit", "false")).lower() == "true"
        outcome = LoadOutcome.PRECOMMITTED if two_phase else LoadOutcome.COMMITTED
        return LoadResult(outcome, label, txn_id, rows, body)
    if status == "Publish Timeout":
        # Committed; the publish (visibility) finishes in the background: do not re-send.
        return LoadResult(LoadOutcome.COMMITTED, label, txn_id, rows, body)
    if status == "Label Already Exists":
        existing = str(body.get("ExistingJobStatus", "")).upper()
        if existing == "FINISHED":
            return LoadResult(LoadOutcome.ALREADY_LOADED, label, txn_id, 0, body)
        # RUNNING: the earlier attempt was prepared or pre-committed; commit it by label (if
        # it is still loading, the commit fails and the batch is retried later).
        return LoadResult(LoadOutcome.TO_COMMIT, label, txn_id, 0, body)
    if status == "Fail":
        refused = bool(body.get("ErrorURL")) or int(body.get("NumberFilteredRows", 0) or 0) > 0
        if refused or any(word.lower() in message.lower() for word in _DATA_ERRORS):
            where = f" (rejected rows: {body['ErrorURL']})" if body.get("ErrorURL") else ""
            raise InvalidBatch(f"stream load {label}: {message}{where}")
        raise SinkUnavailable(f"stream load {label} failed: {message}")
    raise SinkUnavailable(f"stream load {label}: unexpected answer {dict(body)!r}")


# What a commit of a transaction already committed says (a retried commit is not a failure).
_ALREADY_COMMITTED: Final = ("already commit", "already visible", "is already COMMITTED", "VISIBLE")


def classify_commit(body: Mapping[str, Any], what: str) -> None:
    """A ``_stream_load_2pc`` commit answer: returns when the transaction is committed (now or
    before), raises :class:`SinkUnavailable` otherwise (the batch is retried: its label then
    answers ``Label Already Exists`` and the commit is tried again)."""
    status = str(body.get("status", body.get("Status", "")))
    message = str(body.get("msg", body.get("Message", "")))
    if status.lower() == "success":
        return
    if any(word.lower() in message.lower() for word in _ALREADY_COMMITTED):
        return
    raise SinkUnavailable(f"commit of {what} failed: {status} {message}")


class StreamLoader:
    """Sends Stream Loads and their commits over one ``requests.Session``, following the
    FE's redirect to a BE with the credentials kept."""

    def __init__(
        self, session: requests.Session, user: str, password: str, connect_timeout_s: float = 5.0
    ) -> None:
        self._session = session
        self._auth = (user, password)
        self._connect_timeout_s = connect_timeout_s

    def _put(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> requests.Response:
        """PUT, following redirects by hand (same method, body, headers and credentials)."""
        for _ in range(MAX_HOPS):
            try:
                response = self._session.put(
                    url,
                    data=body,
                    headers=dict(headers),
                    auth=self._auth,
                    allow_redirects=False,
                    timeout=(self._connect_timeout_s, timeout_s),
                )
            except requests.RequestException as exc:
                raise SinkUnavailable(f"PUT {url}: {exc}") from exc
            if response.status_code not in REDIRECTS:
                if response.status_code in (401, 403):
                    raise SinkUnavailable(
                        f"PUT {url}: HTTP {response.status_code} (check the Doris user and "
                        "its LOAD privilege)"
                    )
                return response
            location = response.headers.get("Location")
            if not location:
                raise SinkUnavailable(f"PUT {url}: redirect without a Location")
            url = urljoin(url, location)
        raise SinkUnavailable(f"PUT {url}: more than {MAX_HOPS} redirects")

    def load(self, request: LoadRequest) -> LoadResult:
        """One Stream Load, committed before returning (two-phase: pre-commit, then commit)."""
        response = self._put(
            request.url, load_headers(request), request.body, request.timeout_s + 30
        )
        result = classify_load(_body(response, f"stream load {request.label}"), request.label)
        if result.outcome in (LoadOutcome.PRECOMMITTED, LoadOutcome.TO_COMMIT):
            self.commit(request, result)
        return result

    def commit(self, request: LoadRequest, result: LoadResult) -> None:
        """Commit the load's transaction: by its id when the load gave one, else by label."""
        headers = {"txn_operation": "commit"}
        if result.outcome is LoadOutcome.PRECOMMITTED and result.txn_id is not None:
            headers["txn_id"] = str(result.txn_id)
        else:
            headers["label"] = result.label
        what = f"stream load {result.label}"
        response = self._put(request.commit_url(), headers, b"", request.timeout_s)
        classify_commit(_body(response, f"commit of {what}"), what)


def json_lines(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSON, one object per line (strict: NaN is refused by the caller beforehand)."""
    return "".join(
        json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        for row in rows
    ).encode()
